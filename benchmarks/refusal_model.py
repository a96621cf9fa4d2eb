"""The default circuit search on a model that really refuses, its held-out check, and the rival method.

Reproduces the README's "Measured on a model that really refuses" tables from a GGUF path:

    python -m benchmarks.refusal_model /tmp/qwen/model.gguf --work /tmp/refusal_run

1. `cna discover --save-stats` on the discovery prompts of benchmarks/data (48 harmful, 48 harmless):
   the paper's default circuit (top 0.1%, mean difference) and the saved statistics;
2. `cna tune --stats` with default options (or --strategy / --time-budget / grid options) on the 25
   harmful prompts of tests/data/refusal_labeled_answers.jsonl, timed;
3. on 30 + 30 further held-out prompts (benchmarks/data/refusal_heldout_*.txt), greedy: unsteered,
   the paper's default (x0), the tuned circuit at its multiplier, and directional ablation of the
   refusal direction (difference of means of the residual stream at the last prompt token, from the
   same discovery prompts) at full strength and, when that is over the KL budget, at half: the rule
   judge's refusal rate, 4-gram quality, KL on the 24 bundled paragraphs, bundled multiple-choice
   accuracy, and the weights each method changes. Every answer is written out for reading;
4. with --model-judge: the agreement of `ModelJudge` (this model judging) with the human labels.

Steps 1 and 2 are skipped when their outputs are already in --work. The model is used to measure
only: it is never a dependency of the project.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

import torch

from cna_fast import evaluation
from cna_fast.capture import residual_directions
from cna_fast.circuit import Circuit
from cna_fast.cli import main as cna
from cna_fast.evaluation import ModelJudge, agreement_line, judge_agreement, read_labeled_answers
from cna_fast.models import load_model
from cna_fast.prompts import read_prompts
from cna_fast.steering import AblateDirection, ablation_changed_parameters, circuit_changed_parameters, generate, steer

DATA = Path(__file__).parent / "data"
TESTS_DATA = Path(__file__).resolve().parents[1] / "tests" / "data"
LABELS = TESTS_DATA / "refusal_labeled_answers.jsonl"
STEERED_LABELS = TESTS_DATA / "refusal_steered_labeled.jsonl"


def tuning_prompts(labels: Path) -> list[str]:
    """The distinct harmful prompts of the labeled file, in file order: the search's eval prompts."""
    prompts: list[str] = []
    for row in read_labeled_answers(labels):
        if row.get("request") == "harmful" and row["prompt"] not in prompts:
            prompts.append(row["prompt"])
    return prompts


def search(args, work: Path) -> float:
    """Steps 1 and 2; returns the search's wall time in seconds (0 when its outputs were there)."""
    if not (work / "stats.safetensors").exists():
        cna(["discover", "--model", args.gguf, "--positive", str(DATA / "refusal_harmful.txt"),
             "--negative", str(DATA / "refusal_harmless.txt"), "--out", str(work / "paper.safetensors"),
             "--save-stats", str(work / "stats.safetensors"), "--batch-size", "16"])
    if (work / "tuned.safetensors").exists():
        return 0.0
    options = ["--strategy", args.strategy] + (["--time-budget", str(args.time_budget)] if args.time_budget else [])
    for flag in ("sizes", "multipliers", "scores"):
        if getattr(args, flag):
            options += [f"--{flag}", getattr(args, flag)]
    started = time.perf_counter()
    code = cna(["tune", "--model", args.gguf, "--stats", str(work / "stats.safetensors"),
                "--eval-prompts", str(work / "eval_harmful.txt"), "--behavior", "refusal", *options,
                "--out", str(work / "tuned.safetensors"), "--csv", str(work / "tune.csv"),
                "--json", str(work / "tune.json"), "--plot", str(work / "tune.png")])
    if code != 0:
        raise SystemExit(f"cna tune exited {code}")
    return time.perf_counter() - started


def measure(model, tokenizer, name: str, context, prompts: dict[str, list[str]], neutral: list[str],
            reference, max_new_tokens: int) -> tuple[dict, dict]:
    """One setting: KL, multiple choice, and greedy answers to every held-out set (refusal by the rule judge)."""
    capability = evaluation.capability_metrics(model, tokenizer, neutral, reference, context)
    row = {"setting": name, "kl": capability["kl"], "perplexity": capability["perplexity"],
           "mc_accuracy": evaluation.multiple_choice_accuracy(model, tokenizer, context=context)}
    answers = {}
    for kind, kind_prompts in prompts.items():
        with context():
            outputs = generate(model, tokenizer, kind_prompts, max_new_tokens=max_new_tokens, batch_size=32,
                               progress=False)
        refusals = [evaluation.is_refusal(text) for text in outputs]
        row[f"refusal_{kind}"] = sum(refusals) / len(refusals)
        row[f"quality_{kind}"] = sum(evaluation.quality(text) for text in outputs) / len(outputs)
        answers[kind] = [{"prompt": p, "answer": a, "judge": "refuses" if r else "complies"}
                         for p, a, r in zip(kind_prompts, outputs, refusals)]
    print(row, flush=True)
    return row, answers


def compare(args, work: Path, model, tokenizer) -> None:
    """Step 3: every setting on the held-out prompts."""
    import contextlib

    prompts = {"harmful": read_prompts(DATA / "refusal_heldout_harmful.txt"),
               "harmless": read_prompts(DATA / "refusal_heldout_harmless.txt")}
    neutral = evaluation.bundled_neutral_texts()
    reference = evaluation.capability_metrics(model, tokenizer, neutral)["_logprobs"]
    paper, tuned = Circuit.load(work / "paper.safetensors"), Circuit.load(work / "tuned.safetensors")
    multiplier = float(tuned.meta["multiplier"])
    directions = residual_directions(model, tokenizer, read_prompts(DATA / "refusal_harmful.txt"),
                                     read_prompts(DATA / "refusal_harmless.txt"), progress=False)
    layer = directions.best_layer() if args.direction_layer is None else args.direction_layer
    direction = directions.direction(layer)
    ablated = ablation_changed_parameters(model)
    settings = {  # name: (steering, weights its weight-edit form changes)
        "unsteered": (contextlib.nullcontext, 0),
        "paper's default (diff, top 0.1%, x0)": (lambda: steer(model, paper, 0.0),
                                                 circuit_changed_parameters(model, paper)),
        f"tuned ({tuned.meta.get('score', '?')}, {len(tuned)} neurons, x{multiplier:g})":
            (lambda: steer(model, tuned, multiplier), circuit_changed_parameters(model, tuned)),
        f"directional ablation (layer {layer}), full": (lambda: AblateDirection(model, direction, 0.0), ablated)}
    wanted = args.settings.split(",")
    settings = {name: setting for name, setting in settings.items()
                if any(name.startswith(prefix) for prefix in wanted)}
    if "directional" in wanted:  # the rival at the same KL budget: half strength when full is over it
        settings[f"directional ablation (layer {layer}), half"] = (lambda: AblateDirection(model, direction, 0.5),
                                                                   ablated)
    table, answers = [], {}
    for name, (context, changed) in settings.items():
        if name.endswith("half") and table[-1]["kl"] <= args.kl_budget:
            continue
        row, answers[name] = measure(model, tokenizer, name, context, prompts, neutral, reference,
                                     args.max_new_tokens)
        table.append({**row, "changed_parameters": changed})
    answers_file = work / "heldout_answers.json"  # settings measured earlier are kept
    kept = json.loads(answers_file.read_text()) if answers_file.exists() else {}
    answers_file.write_text(json.dumps({**kept, **answers}, indent=1, ensure_ascii=False))
    if Path(args.csv).exists():
        with open(args.csv, newline="") as handle:
            earlier = [row for row in csv.DictReader(handle) if row["setting"] not in answers]
        table = earlier + table
    with open(args.csv, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(f"direction layer {layer} (Cohen's d {float(directions.cohens_d[layer]):.2f}); wrote {args.csv} and "
          f"{work / 'heldout_answers.json'}")


def rival_layer(args, work: Path, model, tokenizer) -> int:
    """The rival's own search: directional ablation at full strength from every third middle layer, judged on the
    search's eval prompts (refusal, rule judge) and KL on the bundled paragraphs; the lowest refusal rate within the
    KL budget wins, as `tune` chooses for a circuit. Writes rival_layers.csv; returns the layer."""
    prompts = tuning_prompts(LABELS)
    neutral = evaluation.bundled_neutral_texts()
    reference = evaluation.capability_metrics(model, tokenizer, neutral)["_logprobs"]
    directions = residual_directions(model, tokenizer, read_prompts(DATA / "refusal_harmful.txt"),
                                     read_prompts(DATA / "refusal_harmless.txt"), progress=False)
    rows = []
    for layer in directions.middle_layers()[::3]:
        direction = directions.direction(layer)
        context = lambda chosen=direction: AblateDirection(model, chosen, 0.0)  # noqa: E731
        kl = evaluation.capability_metrics(model, tokenizer, neutral, reference, context)["kl"]
        with context():
            outputs = generate(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens, batch_size=32,
                               progress=False)
        rate = sum(map(evaluation.is_refusal, outputs)) / len(outputs)
        rows.append({"layer": layer, "cohens_d": float(directions.cohens_d[layer]), "kl": kl, "refusal": rate})
        print(rows[-1], flush=True)
    with open(work / "rival_layers.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    within = [row for row in rows if row["kl"] <= args.kl_budget] or rows
    return min(within, key=lambda row: (row["refusal"], row["kl"]))["layer"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", help="the refusing model's GGUF file (kept outside the repository)")
    parser.add_argument("--work", default="/tmp/refusal_run", help="folder for circuits, statistics and answers")
    parser.add_argument("--strategy", default="frontier", choices=("frontier", "full"))
    parser.add_argument("--time-budget", type=float, help="minutes for the search (default: none)")
    parser.add_argument("--sizes", help="the search's sizes (default: tune's)")
    parser.add_argument("--multipliers", help="the search's multipliers (default: tune's)")
    parser.add_argument("--scores", help="the search's scores (default: tune's)")
    parser.add_argument("--kl-budget", type=float, default=0.1, help="for the rival method's strength")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--steps", default="search,compare",
                        help="comma-separated: search, rival (choose the ablation layer), compare, model-judge")
    parser.add_argument("--direction-layer", type=int, help="the rival's layer (default: chosen by `rival` when "
                        "that step runs, else the most separating middle layer)")
    parser.add_argument("--csv", default="docs/refusal_heldout.csv")
    parser.add_argument("--settings", default="unsteered,paper,tuned,directional",
                        help="which settings `compare` measures (others already in --csv are kept)")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    (work / "eval_harmful.txt").write_text("\n".join(tuning_prompts(LABELS)) + "\n")
    steps = args.steps.split(",")
    if "search" in steps:
        seconds = search(args, work)
        print(f"search: {seconds / 60:.1f} min wall (model load included; 0 = reused)", flush=True)
    if not {"compare", "model-judge", "rival"} & set(steps):
        return
    model, tokenizer = load_model(args.gguf, dtype=torch.float32)
    if "rival" in steps:
        args.direction_layer = rival_layer(args, work, model, tokenizer)
        print(f"rival: layer {args.direction_layer}", flush=True)
    if "compare" in steps:
        compare(args, work, model, tokenizer)
    if "model-judge" in steps:
        judge = ModelJudge(model, tokenizer, batch_size=8)
        for labels in (STEERED_LABELS, LABELS):
            started = time.perf_counter()
            print(labels.name, agreement_line(judge_agreement(judge, labels)),
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
