"""The paper's default circuit against the tuned one, measured on a model that really refuses.

Reproduces the README's "Measured on a model that really refuses" table from a GGUF path:

    python benchmarks/refusal_model.py /tmp/qwen/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf --work /tmp/refusal_run

1. `cna discover` on the discovery prompts of benchmarks/data (48 harmful, 48 harmless requests):
   the paper's default circuit (top 0.1%, mean difference) and the saved statistics;
2. `cna tune --stats` on the held-out harmful prompts (refusal judge, KL budget), a small grid;
3. unsteered, paper's default (x0) and tuned (its recorded multiplier), greedy, on the held-out harmful
   and harmless prompts: refusal by `evaluation.is_refusal`, 4-gram
   quality, answer perplexity (harmful prompts) under the unsteered model, KL on neutral text;
4. the judge's agreement with the human labels of the labeled file.

The held-out prompts are the distinct prompts of the labeled file, so the judge's agreement there
applies to them. Steps 1 and 2 are skipped when their outputs are already in --work.
The model is used to measure only: it is never a dependency of the project.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import time
from pathlib import Path

import torch

from cna_fast import evaluation
from cna_fast.circuit import Circuit
from cna_fast.cli import main as cna
from cna_fast.evaluation import agreement_line, judge_agreement, read_labeled_answers
from cna_fast.models import load_model
from cna_fast.steering import generate, steer

DATA = Path(__file__).parent / "data"
LABELS = Path(__file__).resolve().parents[1] / "tests" / "data" / "refusal_labeled_answers.jsonl"


def held_out_prompts(labels: Path) -> dict[str, list[str]]:
    """The distinct prompts of the labeled file, by request type, in file order."""
    prompts: dict[str, list[str]] = {"harmful": [], "harmless": []}
    for row in read_labeled_answers(labels):
        chosen = prompts.get(row.get("request"))
        if chosen is not None and row["prompt"] not in chosen:
            chosen.append(row["prompt"])
    return prompts


def search(args, work: Path, eval_harmful: Path) -> None:
    """Steps 1 and 2: the paper's default circuit with saved statistics, then the circuit search."""
    if not (work / "stats.safetensors").exists():
        cna(["discover", "--model", args.gguf, "--positive", str(DATA / "refusal_harmful.txt"),
             "--negative", str(DATA / "refusal_harmless.txt"), "--out", str(work / "paper.safetensors"),
             "--save-stats", str(work / "stats.safetensors"), "--batch-size", "16"])
    if not (work / "tuned.safetensors").exists():
        cna(["tune", "--model", args.gguf, "--stats", str(work / "stats.safetensors"),
             "--eval-prompts", str(eval_harmful), "--behavior", "refusal", "--kl-budget", str(args.kl_budget),
             "--sizes", args.sizes, "--multipliers", args.multipliers, "--scores", args.scores,
             "--max-new-tokens", str(args.tune_tokens),
             "--neutral", str(work / "neutral.txt"), "--batch-size", "16", "--out", str(work / "tuned.safetensors"),
             "--csv", str(work / "tune.csv"), "--json", str(work / "tune.json"), "--plot", str(work / "tune.png")])


def compare(model, tokenizer, settings: dict[str, tuple[Circuit | None, float]], prompts: dict[str, list[str]],
            neutral: list[str], max_new_tokens: int) -> tuple[list[dict], dict]:
    """Greedy answers of every setting to every held-out prompt set; metrics per setting."""
    reference = evaluation.capability_metrics(model, tokenizer, neutral)
    table, answers = [], {}
    for name, (circuit, multiplier) in settings.items():
        context = (lambda c=circuit, m=multiplier: steer(model, c, m)) if circuit is not None else None
        row = {"setting": name, "neurons": len(circuit) if circuit is not None else 0,
               "multiplier": multiplier if circuit is not None else 1.0,
               "kl_neutral": evaluation.capability_metrics(model, tokenizer, neutral, reference["_logprobs"],
                                                         context)["kl"] if context else 0.0}
        answers[name] = {}
        for kind, kind_prompts in prompts.items():
            outputs = generate(model, tokenizer, kind_prompts, circuits=circuit, multiplier=multiplier,
                               max_new_tokens=max_new_tokens, batch_size=16)
            refusals = [evaluation.is_refusal(text) for text in outputs]
            perplexities = [value for value in evaluation.answer_perplexity(model, tokenizer, kind_prompts, outputs)
                            if math.isfinite(value)]
            row[f"refusal_{kind}"] = sum(refusals) / len(refusals)
            row[f"quality_{kind}"] = sum(evaluation.quality(text) for text in outputs) / len(outputs)
            row[f"answer_ppl_{kind}"] = sum(perplexities) / len(perplexities) if perplexities else float("nan")
            answers[name][kind] = [{"prompt": p, "answer": a, "refusal": r}
                                   for p, a, r in zip(kind_prompts, outputs, refusals)]
        table.append(row)
    return table, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the refusing model's GGUF file (kept outside the repository)")
    parser.add_argument("--work", default="/tmp/refusal_run", help="folder for circuits, statistics and answers")
    parser.add_argument("--labels", default=str(LABELS), help="human-labeled answers (JSONL)")
    parser.add_argument("--sizes", default="0.001,0.002,0.004")
    parser.add_argument("--scores", default="diff,t")
    parser.add_argument("--kl-budget", type=float, default=0.1)
    parser.add_argument("--tune-tokens", type=int, default=32)
    parser.add_argument("--multipliers", default="0,-0.5,-1")
    parser.add_argument("--neutral-count", type=int, default=2, help="bundled neutral paragraphs for the search's KL")
    parser.add_argument("--compare-neutral-count", type=int, default=6,
                        help="bundled neutral paragraphs for the table's KL")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--sets", default="harmful,harmless", help="held-out prompt sets to answer")
    parser.add_argument("--settings", default="unsteered,paper,tuned",
                        help="settings to compare (the search runs only when tuned is among them)")
    parser.add_argument("--csv", default="docs/refusal_model.csv")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prompts = held_out_prompts(Path(args.labels))
    eval_harmful = work / "eval_harmful.txt"
    eval_harmful.write_text("\n".join(prompts["harmful"]) + "\n")
    neutral = evaluation.bundled_neutral_texts()
    (work / "neutral.txt").write_text("\n".join(neutral[:args.neutral_count]) + "\n")
    started = time.perf_counter()
    wanted = args.settings.split(",")
    if "tuned" in wanted:
        search(args, work, eval_harmful)
    model, tokenizer = load_model(args.gguf, dtype=torch.float32)
    settings = {"unsteered": (None, 1.0), "paper": (Circuit.load(work / "paper.safetensors"), 0.0)}
    if "tuned" in wanted:
        tuned = Circuit.load(work / "tuned.safetensors")
        settings["tuned"] = (tuned, float(tuned.meta["multiplier"]))
    settings = {name: setting for name, setting in settings.items() if name in wanted}
    chosen_sets = {kind: prompts[kind] for kind in args.sets.split(",")}
    table, answers = compare(model, tokenizer, settings, chosen_sets, neutral[:args.compare_neutral_count],
                             args.max_new_tokens)
    agreement = judge_agreement(evaluation.is_refusal, args.labels)
    (work / f"answers_{'_'.join(settings)}.json").write_text(json.dumps(answers, indent=1))
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    for row in table:
        print(row)
    print(agreement_line(agreement))
    print(f"comparison done in {time.perf_counter() - started:.0f} s (search steps included when run)")


if __name__ == "__main__":
    main()
