"""The circuit against its baselines: behavior, quality and capability per method and strength.

`compare_methods` generates every (method, strength) setting as rows of one batched run: the
circuit ("cna") and a random circuit of the same shape scale neurons by the strength, the
residual-stream baseline ("caa") adds (strength - 1) times the MLP-output difference, and
directional ablation ("ablation") keeps strength times the component along a residual direction
(0 ablates it), so strength 1 is the unsteered model for every method.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch

from .._io import csv_text, write_text_atomic
from ..capture import ResidualDirections
from ..circuit import Circuit
from ..errors import CNAError, text_list
from ..settings import with_options
from ..steering import AblateDirection, AddDirections, GenerationSettings, caa, generate, steer
from .judges import judge_answers, resolve_behavior
from .metrics import (answer_perplexity, bundled_neutral_texts, capability_metrics, finite_mean,
                      multiple_choice_accuracy, quality)

_SWEEP_COLUMNS = ("prompt_index", "prompt", "output", "behavior", "quality", "answer_ppl")


def score_answers(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], behavior: str | Callable, *,
                  chat_template: bool | str | None = None, batch_size: int = 16) -> list[dict]:
    """Per answer: the behavior (bool or score), the 4-gram quality and the answer perplexity under the
    unsteered model. Shared by `compare_methods` and `cna sweep`; call it with no steering active."""
    verdicts = judge_answers(resolve_behavior(behavior), prompts, answers)
    perplexities = answer_perplexity(model, tokenizer, prompts, answers, chat_template=chat_template,
                                     batch_size=batch_size)
    return [{"behavior": verdict, "quality": quality(answer), "answer_ppl": perplexity}
            for verdict, answer, perplexity in zip(verdicts, answers, perplexities)]




METHODS = ("cna", "caa", "random", "ablation")
DEFAULT_METHODS = ("cna", "caa", "random")  # ablation needs a direction: asked for by name
DEFAULT_STRENGTHS = (0.0, 0.5, 1.0, 2.0)
_COLUMNS = (("behavior_rate", 8, ".3f"), ("quality", 7, ".3f"), ("answer_ppl", 10, ".2f"), ("kl", 7, ".4f"),
            ("perplexity", 8, ".2f"), ("mc_accuracy", 6, ".3f"))


@dataclass
class MethodComparison:
    """Metrics per (method, strength) and every generation, from `compare_methods`."""

    metrics: list[dict]
    generations: list[dict]

    def table(self) -> str:
        names = {"answer_ppl": "answer_ppl", "perplexity": "ppl", "mc_accuracy": "mc_acc", "behavior_rate": "behavior"}
        method_width = max([7] + [len(row["method"]) for row in self.metrics])
        header = f"{'method':<{method_width}} {'strength':>8} " + " ".join(f"{names.get(key, key):>{width}}"
                                                                         for key, width, _ in _COLUMNS)
        lines = [header, "-" * len(header)]
        for row in self.metrics:
            cells = [f"{'-':>{width}}" if row[key] is None else f"{row[key]:>{width}{form}}"
                     for key, width, form in _COLUMNS]
            lines.append(f"{row['method']:<{method_width}} {row['strength']:>8g} " + " ".join(cells))
        return "\n".join(lines)

    def sweep_rows(self) -> list[dict]:
        """Every generation as a row of the `cna sweep` CSV: multiplier, prompt, output and their measures."""
        return [{"multiplier": item["strength"], **{key: item[key] for key in _SWEEP_COLUMNS}}
                for item in self.generations]

    def to_csv(self, path: str | os.PathLike | None = None) -> str:
        """The metrics per (method, strength) as CSV text; also written to `path` (atomically) if given."""
        text = csv_text(self.metrics)
        if path is not None:
            write_text_atomic(path, text)
        return text

    def to_json(self, path: str | os.PathLike | None = None, **header: Any) -> str:
        """`header` (e.g. behavior and judge), the metrics and every generation as JSON; also written to `path`."""
        text = json.dumps({**header, "metrics": self.metrics, "generations": self.generations}, indent=2)
        if path is not None:
            write_text_atomic(path, text + "\n")
        return text


def default_strengths(circuit: Circuit) -> list[float]:
    """The strengths to compare when none are given: 1 and the circuit's tuned multiplier, else 0, 0.5, 1, 2."""
    tuned = circuit.meta.get("multiplier")
    return list(DEFAULT_STRENGTHS) if tuned is None else sorted({1.0, float(tuned)})


def _strength_context(model, method: str, strength: float, circuit, control,
                      direction: torch.Tensor | None) -> Callable[[], ContextManager]:
    """The steering for one method at one strength: CNA/random scale neurons by `strength`; CAA adds
    (strength - 1) times the MLP-output difference; ablation keeps `strength` times the component along
    the direction; so strength 1 is the identity for every method."""
    if method == "cna":
        return lambda: steer(model, circuit, strength)
    if method == "random":
        return lambda: steer(model, control, strength)
    if method == "ablation":
        return lambda: AblateDirection(model, direction, strength)
    return lambda: caa(model, circuit, strength - 1.0)


def _ablation_direction(direction: ResidualDirections | torch.Tensor | None,
                        methods: Sequence[str]) -> torch.Tensor | None:
    """The unit direction the "ablation" method projects out (a ResidualDirections gives its best layer's)."""
    if "ablation" not in methods:
        return None
    if direction is None:
        raise CNAError("the ablation baseline needs a residual direction: pass direction=residual_directions(model, "
                       "tokenizer, positive, negative) (or a [hidden] tensor); on the command line --positive and "
                       "--negative")
    return direction.direction() if isinstance(direction, ResidualDirections) else direction


def _check_comparison(circuit, prompts: Sequence[str], strengths: Sequence[float], methods: Sequence[str]) -> None:
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise CNAError(f"unknown methods {unknown}: choose from {', '.join(METHODS)}")
    if not prompts:
        raise CNAError("no prompts to evaluate")
    if not strengths or not all(math.isfinite(value) for value in strengths):
        raise CNAError("strengths must be finite numbers")
    if "caa" in methods and circuit.caa_directions is None:
        raise CNAError("the CAA baseline needs a circuit with CAA directions: rediscover it with this cna_fast")


IDENTITY = ("identity", 1.0)


def _generation_key(method: str, strength: float) -> tuple[str, float]:
    """Strength 1 is the unsteered model for every method: those rows are generated once and shared."""
    return IDENTITY if strength == 1.0 else (method, strength)


def _generate_settings(model, tokenizer, circuit, control, direction: torch.Tensor | None, prompts: list[str],
                       keys: list[tuple[str, float]], generation: GenerationSettings,
                       progress: bool) -> dict[tuple[str, float], list[str]]:
    """One batched generation of every (method, strength) setting, with per-row steering."""
    table, alphas, kept = [], [], []
    for method, value in keys:
        table += [[value if method == "cna" else 1.0, value if method == "random" else 1.0]] * len(prompts)
        alphas += [value - 1.0 if method == "caa" else 0.0] * len(prompts)
        kept += [value if method == "ablation" else 1.0] * len(prompts)
    alphas, kept = torch.tensor(alphas), torch.tensor(kept)
    used = {method for method, _ in keys}

    @contextlib.contextmanager
    def residual_rows(rows: list[int]) -> Iterator[None]:
        """The residual-stream baselines of one batch, per row (CAA alpha 0 and ablation strength 1: unchanged)."""
        with contextlib.ExitStack() as stack:
            if "caa" in used:
                stack.enter_context(AddDirections(model, circuit.caa_layers, circuit.caa_directions, alphas[rows]))
            if "ablation" in used:
                stack.enter_context(AblateDirection(model, direction, kept[rows]))
            yield

    residual = residual_rows if used & {"caa", "ablation"} else None
    texts = generate(model, tokenizer, prompts * len(keys), circuits=[circuit, control],
                     multipliers=torch.tensor(table), batch_context=residual, generation=generation, progress=progress)
    return {key: texts[index * len(prompts):(index + 1) * len(prompts)] for index, key in enumerate(keys)}


def _capability_rows(model, tokenizer, circuit, control, direction, configs, neutral, questions, batch_size: int,
                     progress: bool) -> list[dict]:
    """KL, perplexity and multiple-choice accuracy per (method, strength); strength 1 is measured once."""
    from tqdm.auto import tqdm

    neutral = list(neutral) if neutral is not None else bundled_neutral_texts()
    base = capability_metrics(model, tokenizer, neutral, batch_size=batch_size)
    base_row = {"kl": 0.0, "perplexity": base["perplexity"],
                "mc_accuracy": multiple_choice_accuracy(model, tokenizer, questions, batch_size=batch_size)}
    rows = []
    for method, value in tqdm(configs, desc="capability (KL, perplexity, multiple choice)", unit="setting",
                              disable=not progress):
        if _generation_key(method, value) == IDENTITY:
            rows.append(dict(base_row))
            continue
        context = _strength_context(model, method, value, circuit, control, direction)
        measured = capability_metrics(model, tokenizer, neutral, base["_logprobs"], context, batch_size)
        rows.append({"kl": measured["kl"], "perplexity": measured["perplexity"],
                     "mc_accuracy": multiple_choice_accuracy(model, tokenizer, questions, context, batch_size)})
    return rows


def compare_methods(model, tokenizer, circuit: Circuit, prompts: Sequence[str],
                    strengths: Sequence[float] = DEFAULT_STRENGTHS, *, methods: Sequence[str] = DEFAULT_METHODS,
                    behavior: Callable | str = "refusal", capability: bool = True, neutral: Sequence[str] | None = None,
                    questions: Sequence[dict] | None = None, generation: GenerationSettings | None = None,
                    control_seed: int = 0, direction: ResidualDirections | torch.Tensor | None = None,
                    progress: bool = True, **options: Any) -> MethodComparison:
    """Behavior rate, quality (4-gram and answer perplexity), KL, perplexity and multiple-choice accuracy per
    method and strength: the circuit against its baselines.

    All generations run as one batched generation with per-row steering; strength 1 (the unsteered model for
    every method) is generated and measured once. methods: "cna" (the circuit), "caa" (residual-stream
    baseline from the circuit's MLP-output directions, alpha = strength - 1), "random" (as many random neurons
    in the same layers, drawn with `control_seed`), "ablation" (directional ablation of `direction`: a
    ResidualDirections, whose best middle layer is used, or a [hidden] tensor; strength 0 projects it out of every
    write into the residual stream, see `steering.AblateDirection`; not among the default methods).
    behavior: a name in BEHAVIORS, a callable text -> bool or score, or a judge that reads the prompts too
    (`ModelJudge`). capability=False skips the KL / perplexity /
    multiple-choice pass on `neutral` texts and `questions` (default: the bundled ones); those columns are None.
    generation / options: how answers are generated (a GenerationSettings or its fields; 48 new tokens unless
    given).
    """
    classifier = resolve_behavior(behavior)
    generation, = with_options(options, generation or GenerationSettings(max_new_tokens=48))
    prompts, strengths = text_list(prompts, "prompts"), [float(value) for value in strengths]
    neutral = text_list(neutral, "neutral") if neutral is not None else None
    _check_comparison(circuit, prompts, strengths, methods)
    direction = _ablation_direction(direction, methods)
    control = circuit.random_like(control_seed)
    configs = [(method, value) for method in methods for value in strengths]
    keys = list(dict.fromkeys(_generation_key(method, value) for method, value in configs))
    outputs = _generate_settings(model, tokenizer, circuit, control, direction, prompts, keys, generation, progress)
    scored = {key: score_answers(model, tokenizer, prompts, texts, classifier, chat_template=generation.chat_template,
                                 batch_size=generation.batch_size) for key, texts in outputs.items()}
    capabilities = (_capability_rows(model, tokenizer, circuit, control, direction, configs, neutral, questions,
                                     generation.batch_size, progress) if capability
                    else [{"kl": None, "perplexity": None, "mc_accuracy": None} for _ in configs])
    metrics, generations = [], []
    for (method, value), measured in zip(configs, capabilities):
        key = _generation_key(method, value)
        rows = scored[key]
        metrics.append({"method": method, "strength": value,
                        "behavior_rate": sum(row["behavior"] for row in rows) / len(rows),
                        "quality": sum(row["quality"] for row in rows) / len(rows),
                        "answer_ppl": finite_mean(row["answer_ppl"] for row in rows), **measured,
                        "prompts": len(rows)})
        generations += [{"method": method, "strength": value, "prompt_index": index, "prompt": prompt,
                         "output": output, **row}
                        for index, (prompt, output, row) in enumerate(zip(prompts, outputs[key], rows))]
    return MethodComparison(metrics, generations)
