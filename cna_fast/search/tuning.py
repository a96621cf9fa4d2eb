"""Circuit search: circuit size x multiplier x score under a KL budget (`tune`).

The paper's fixed recipe (top 0.1% of neurons, multiplier 0) can remove a surface template and
leave the behavior: another template takes over. So size, strength and score are searched. It is
made cheap in three ways:

- one discovery serves every size: the circuits of one score are prefixes of one ranking;
- every setting is a row of the same batched passes (see `grid`: disjoint shells as rows);
- KL on neutral text needs forward passes only, so it runs first, for every setting, and prunes
  the settings over the budget; successive halving then judges the rest on a few prompts with
  few tokens and spends full generations only on the most promising ones.

Optionally, iterative discovery captures the statistics again with the chosen circuit applied,
so that the neurons of the template that takes over are found, and tries their union.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..attribution import attribute, eligible_count
from ..capture import capture_contrast
from ..circuit import Circuit
from ..errors import CircuitWeightsWarning, CNAError, positive_int, real_number, text_list
from ..evaluation import bundled_neutral_texts, judge_answers, quality, resolve_behavior
from ..evaluation.metrics import next_token_logprobs, next_token_mask, token_kl
from .._io import printable
from ..models import get_adapter, is_moe
from ..models.content import weights_differ
from ..pipeline import capture_layers, mlp_output_directions, provenance
from ..settings import CaptureSettings, with_options
from ..stats import MoEStats, NeuronStats, Stats
from ..steering import GenerationSettings, generate, steer
from ..steering.scale import check_multiplier_fits
from .grid import SearchSpace, candidate_rows, grid, paper_default, size_grid
from .result import Candidate, TuneResult, better_key, choose

DEFAULT_KL_BUDGET = 0.1  # nats of mean next-token KL on neutral text
DEFAULT_QUALITY_FLOOR = 0.9


@dataclass(frozen=True)
class SearchBudget:
    """What the search may cost.

    kl_budget: the most mean next-token KL (nats) a setting may cost on `neutral` text (default: the
        bundled paragraphs); settings over it are never generated.
    rungs / eta: successive halving; every rung keeps 1/eta of the settings on eta times fewer prompts
        and tokens than the next, the last one is full.
    """

    kl_budget: float = DEFAULT_KL_BUDGET
    neutral: tuple[str, ...] | None = None
    rungs: int = 2
    eta: int = 3

    def __post_init__(self) -> None:
        budget = real_number(self.kl_budget, "kl_budget")
        if not (math.isfinite(budget) and budget > 0):
            raise CNAError(f"kl_budget must be a positive number of nats, got {self.kl_budget!r} (e.g. 0.1)")
        if self.neutral is not None:
            neutral = tuple(text_list(self.neutral, "neutral"))
            if not neutral or not all(text.strip() for text in neutral):
                raise CNAError("neutral must hold non-empty texts (or None for the bundled paragraphs)")
            object.__setattr__(self, "neutral", neutral)
        positive_int(self.rungs, "rungs")
        if positive_int(self.eta, "eta") < 2:
            raise CNAError(f"successive halving needs eta >= 2, got {self.eta}")

    def neutral_texts(self) -> list[str]:
        return list(self.neutral) if self.neutral is not None else bundled_neutral_texts()


@dataclass(frozen=True)
class Judging:
    """How answers are judged: `behavior`, a name in `evaluation.BEHAVIORS` or a callable text -> bool or score
    (or a judge that reads the prompts too); `quality_floor`, the least mean `evaluation.quality` of the choice."""

    behavior: str | Callable = "refusal"
    quality_floor: float = DEFAULT_QUALITY_FLOOR

    def __post_init__(self) -> None:
        resolve_behavior(self.behavior)
        if not 0.0 <= real_number(self.quality_floor, "quality_floor") <= 1.0:
            raise CNAError(f"quality_floor must be in [0, 1], got {self.quality_floor!r}")

    @property
    def name(self) -> str:
        behavior = self.behavior
        return behavior if isinstance(behavior, str) else getattr(behavior, "__name__", "custom")


def batched_kl(model, tokenizer, shells: Sequence[Circuit], table: torch.Tensor, texts: Sequence[str], *,
               max_logits: int = 1 << 25, progress: bool = False) -> torch.Tensor:
    """Mean next-token KL(unsteered || steered) on `texts` for every row of `table` [settings, shells].

    The texts are repeated once per setting and run as rows of the same forwards, each row
    steered by its own multipliers. The mean is over every real next-token position of all texts,
    as in `evaluation.capability_metrics`. max_logits bounds the logits held at once (rows x tokens x vocab).
    """
    from tqdm.auto import tqdm

    if not shells:
        return torch.zeros(table.shape[0], dtype=torch.float64)
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    ids, attention = encoded.input_ids, encoded.attention_mask
    mask = next_token_mask(attention)
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, max_logits // (ids.shape[1] * vocab))
    totals = torch.zeros(table.shape[0], dtype=torch.float64)
    with tqdm(total=table.shape[0] * ids.shape[0], desc="KL", unit="row", disable=not progress) as bar:
        for first in range(0, ids.shape[0], rows):
            texts_here = list(range(first, min(first + rows, ids.shape[0])))
            reference = next_token_logprobs(model, ids[texts_here], attention[texts_here])
            pairs = [(setting, text) for setting in range(table.shape[0]) for text in range(len(texts_here))]
            for start in range(0, len(pairs), rows):
                settings = [setting for setting, _ in pairs[start:start + rows]]
                local = [text for _, text in pairs[start:start + rows]]
                chosen = [texts_here[text] for text in local]
                with steer(model, list(shells), multipliers=table[settings]):
                    steered = next_token_logprobs(model, ids[chosen], attention[chosen])
                kl = token_kl(reference[local], steered) * mask[chosen]
                totals.index_add_(0, torch.tensor(settings), kl.sum(-1).double())
                bar.update(len(settings))
    return (totals / mask.sum()).clamp_min(0.0)


def halving_rungs(n_prompts: int, max_new_tokens: int, rungs: int, eta: int) -> list[tuple[int, int]]:
    """(prompts, new tokens) per rung: each rung eta times fewer of both than the next, the last one full."""
    if rungs < 1 or eta < 2:
        raise CNAError(f"successive halving needs rungs >= 1 and eta >= 2, got {rungs} and {eta}")
    schedule = []
    for rung in range(rungs):
        shrink = eta ** (rungs - 1 - rung)
        schedule.append((min(n_prompts, max(4, math.ceil(n_prompts / shrink))),
                         min(max_new_tokens, max(4, math.ceil(max_new_tokens / shrink)))))
    return schedule


@dataclass
class _Search:
    """The model, prompts and settings of one search, and the measurements it runs."""

    model: object
    tokenizer: object
    eval_prompts: list[str]
    space: SearchSpace
    budget: SearchBudget
    judging: Judging
    generation: GenerationSettings
    progress: bool
    neutral: list[str] = field(default_factory=list)
    tokens_spent: int = 0
    baseline: Candidate = field(default_factory=lambda: Candidate(None, 0, 1.0, None, stage="baseline"))

    def __post_init__(self) -> None:
        self.neutral = self.budget.neutral_texts()
        self.rungs = halving_rungs(len(self.eval_prompts), self.generation.max_new_tokens, self.budget.rungs,
                                   self.budget.eta)
        self.baseline.kl = 0.0

    def measure_kl(self, candidates: list[Candidate]) -> None:
        shells, table = candidate_rows(candidates)
        values = batched_kl(self.model, self.tokenizer, shells, table, self.neutral, progress=self.progress)
        for candidate, value in zip(candidates, values.tolist()):
            candidate.kl = value if math.isfinite(value) else math.inf
            if not candidate.kl <= self.budget.kl_budget:
                candidate.stage = "pruned by KL"

    def judge_rows(self, candidates: list[Candidate], n_prompts: int, tokens: int, stage: str) -> None:
        """Generate for every candidate on the first `n_prompts` eval prompts, as rows of one batched run."""
        prompts = self.eval_prompts[:n_prompts]
        shells, table = candidate_rows(candidates)
        steering = {"circuits": shells, "multipliers": table.repeat_interleave(n_prompts, 0)} if shells else {}
        texts = generate(self.model, self.tokenizer, prompts * len(candidates), progress=self.progress,
                         generation=dataclasses.replace(self.generation, max_new_tokens=tokens), **steering)
        self.tokens_spent += len(texts) * tokens
        judge = resolve_behavior(self.judging.behavior)
        for index, candidate in enumerate(candidates):
            outputs = texts[index * n_prompts:(index + 1) * n_prompts]
            candidate.behavior_rate = sum(judge_answers(judge, prompts, outputs)) / len(outputs)
            candidate.quality = sum(quality(text) for text in outputs) / len(outputs)
            candidate.prompts, candidate.new_tokens, candidate.stage = n_prompts, tokens, stage
            candidate.tokens_spent += n_prompts * tokens
            candidate.outputs = outputs

    def halve(self, candidates: list[Candidate], label: str, forced: Sequence[Candidate] = ()) -> None:
        """Successive halving over the settings within the KL budget; `forced` join the last rung."""
        alive = [candidate for candidate in candidates if candidate.kl <= self.budget.kl_budget]
        for rung, (n_prompts, tokens) in enumerate(self.rungs):
            last = rung == len(self.rungs) - 1
            if last:
                alive += [candidate for candidate in forced if candidate not in alive]
            stage = f"{label}final" if last else f"{label}screen {rung + 1}"
            self.judge_rows([self.baseline, *alive] if label == "" else alive, n_prompts, tokens, stage)
            if last:
                for candidate in alive:
                    candidate.final = True
            else:
                ranked = better_key(self.space.goal)  # settings under the quality floor go last
                alive.sort(key=lambda candidate: (candidate.quality < self.judging.quality_floor, *ranked(candidate)))
                alive = alive[:max(min(4, len(alive)), math.ceil(len(alive) / self.budget.eta))]
        self.baseline.final = True
        self.baseline.stage = "baseline"

    def choose(self, candidates: list[Candidate]) -> Candidate | None:
        return choose(candidates, self.budget.kl_budget, self.judging.quality_floor, self.space.goal)


def tune(model, tokenizer, positive: Sequence[str] | None = None, negative: Sequence[str] | None = None,
         eval_prompts: Sequence[str] = (), *, space: SearchSpace | None = None, budget: SearchBudget | None = None,
         judging: Judging | None = None, capture: CaptureSettings | None = None,
         generation: GenerationSettings | None = None, stats: Stats | None = None, progress: bool = True,
         **options: Any) -> TuneResult:
    """Search circuit size x multiplier x score for the setting that best removes (or induces) a behavior.

    positive / negative: discovery prompts (or `stats`, saved statistics of them: one discovery
        serves every size). eval_prompts: held-out prompts whose answers show the behavior.
    space: what is searched (sizes, multipliers, scores, goal, exclude_layers, iterative rounds).
    budget: what it may cost (kl_budget on neutral text, successive-halving rungs and eta).
    judging: how answers are judged (behavior, quality_floor).
    capture / generation: how the discovery prompts are captured and the eval answers generated
        (default: 40 new tokens in batches of 32).
    options: any field of those settings as a keyword (behavior="refusal", kl_budget=0.1, sizes=...);
        one that several settings have (batch_size, chat_template) goes to all of them.
    Chooses the best behavior rate within the KL budget and quality floor, the smallest circuit among ties.
    """
    space, budget, judging, capture, generation = with_options(
        options, space or SearchSpace(), budget or SearchBudget(), judging or Judging(), capture or CaptureSettings(),
        generation or GenerationSettings(max_new_tokens=40, batch_size=32))
    eval_prompts = text_list(eval_prompts, "eval_prompts")
    if not eval_prompts or not all(prompt.strip() for prompt in eval_prompts):
        raise CNAError("tune needs held-out eval prompts that show the behavior (none given, or an empty one)")
    adapter = get_adapter(model)
    capture = capture_layers(adapter, capture, space.exclude_layers)
    dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    check_multiplier_fits(space.multiplier_list(), dtype)  # before any work: the table and the model's dtype
    _check_neutral(tokenizer, budget.neutral_texts())
    positive, negative = _discovery_prompts(positive, negative, stats is None or space.iterative > 0)
    if stats is None:
        stats = capture_contrast(model, tokenizer, positive, negative, capture, progress=progress)
    _check_stats(stats, model)
    sizes = size_grid(adapter.num_neurons, eligible_count(stats, space.exclude_layers), space.sizes)
    search = _Search(model, tokenizer, eval_prompts, space, budget, judging, generation, progress)
    meta = {**provenance(model, tokenizer, capture),
            **{key: stats.meta[key] for key in ("reduction", "capture", "chat_template") if key in stats.meta}}
    if stats.meta.get("model") is not None:
        meta["statistics_model"] = stats.meta["model"]  # where the statistics came from, when given saved ones
    candidates = grid(stats, space, sizes, adapter.num_neurons, meta)
    search.measure_kl(candidates)
    reference = paper_default(candidates, adapter.num_neurons, space.goal)
    search.halve(candidates, "", forced=[reference] if reference is not None else [])
    chosen = search.choose(candidates)
    for round_number in range(1, space.iterative + 1):
        if chosen is None:
            break
        candidates += _iterative_round(search, chosen, round_number, positive, negative, sizes, capture)
        chosen = search.choose(candidates)
    result = TuneResult(candidates=candidates, baseline=search.baseline, chosen=chosen, behavior=judging.name,
                        goal=space.goal, kl_budget=float(budget.kl_budget), quality_floor=float(judging.quality_floor),
                        total_neurons=adapter.num_neurons, tokens_spent=search.tokens_spent,
                        full_grid_tokens=(len(candidates) + 1) * len(eval_prompts) * generation.max_new_tokens)
    result.circuit = _chosen_circuit(model, chosen, stats, result.summary_meta())
    return result


def rediscover(model, tokenizer, chosen: Candidate, positive: Sequence[str], negative: Sequence[str], *,
               space: SearchSpace, sizes: list[int], round_number: int, capture: CaptureSettings,
               progress: bool = False) -> list[Candidate]:
    """Capture again with the chosen circuit applied; candidates are its union with the new top neurons.

    With the first template's neurons steered away (ablated to remove a behavior, at the chosen
    multiplier to induce it), the contrast shows the neurons of the template that takes over; the
    chosen circuit's own neurons are never selected again.
    """
    applied = 0.0 if space.goal == "remove" else chosen.multiplier
    total_neurons = get_adapter(model).num_neurons
    with steer(model, chosen.circuit, applied):
        stats = capture_contrast(model, tokenizer, positive, negative, capture, progress=progress)
    eligible = eligible_count(stats, space.exclude_layers) - len(chosen.circuit)
    candidates = []
    for size in sorted({min(size, eligible) for size in sizes if eligible > 0}):
        added = attribute(stats, top_k=size, score=chosen.score, exclude_layers=space.exclude_layers,
                          exclude_neurons=chosen.circuit, total_neurons=total_neurons)
        meta = {**chosen.circuit.meta, "top_k": len(chosen.circuit) + size,
                "iterative": {"round": round_number, "base_size": len(chosen.circuit), "added": size,
                              "applied_multiplier": applied}}
        union = Circuit.join([chosen.circuit, added], meta)
        candidates += [Candidate(chosen.score, len(union), m, union, round=round_number)
                       for m in space.multiplier_list()]
    return candidates


def _iterative_round(search: _Search, chosen: Candidate, round_number: int, positive: list[str],
                     negative: list[str], sizes: list[int], capture: CaptureSettings) -> list[Candidate]:
    """One round of iterative discovery: capture with `chosen` applied, measure the unions with the new neurons."""
    found = rediscover(search.model, search.tokenizer, chosen, positive, negative, space=search.space, sizes=sizes,
                       round_number=round_number, capture=capture, progress=search.progress)
    search.measure_kl(found)
    search.halve(found, f"round {round_number} ")
    return found


def _check_stats(stats: Stats, model) -> None:
    """Statistics captured on this model (its architecture, when they record it) and of its kind."""
    adapter = get_adapter(model)
    recorded = stats.meta.get("architecture")
    shape_keys = ("model_type", "num_layers", "d_ff")
    here = {key: adapter.architecture()[key] for key in shape_keys}
    if recorded and not isinstance(recorded, dict):
        raise CNAError(f"these statistics record an architecture of type {type(recorded).__name__}: the file is "
                       "damaged")
    if recorded and {key: recorded.get(key) for key in shape_keys} != here:
        raise CNAError(f"these statistics were captured on {stats.meta.get('model', 'another model')} "
                       f"({ {key: recorded.get(key) for key in shape_keys} }), not on this model ({here}): pass that "
                       "model, or capture statistics on this one")
    if isinstance(stats, MoEStats) != is_moe(adapter):
        kind = "a mixture-of-experts" if isinstance(stats, MoEStats) else "a dense"
        raise CNAError(f"these statistics are of {kind} model, unlike this one: capture statistics on this model")
    widths = [stats.width] if isinstance(stats, NeuronStats) else [part.width for part in stats.ordinary]
    if (any(not 0 <= layer < adapter.num_layers for layer in stats.layers)
            or any(width not in adapter.widths for width in widths)):
        raise CNAError(f"these statistics ({len(stats.layers)} layers, widths {widths}) do not fit this model "
                       f"({adapter.num_layers} layers x {max(adapter.widths)} neurons): capture them on this model")
    if recorded and weights_differ(recorded.get("weights"), adapter.architecture().get("weights")):
        warnings.warn(f"these statistics were captured on {printable(stats.meta.get('model', 'another model'))}, "
                      "whose down-projection weights differ from this model's although the shapes match (base vs "
                      "instruct, or another fine-tune?): the circuit found from them may mean something else here; "
                      "capture statistics on this model to be sure", CircuitWeightsWarning, stacklevel=3)


def _chosen_circuit(model, chosen: Candidate | None, stats: Stats, summary: dict) -> Circuit | None:
    """The chosen circuit, with its multiplier and the search's summary in its metadata and CAA directions."""
    if chosen is None:
        return None
    layers, directions = mlp_output_directions(model, stats)
    return dataclasses.replace(chosen.circuit, meta={**chosen.circuit.meta, "multiplier": chosen.multiplier,
                                                     "tune": summary},
                               caa_layers=layers, caa_directions=directions)


def _check_neutral(tokenizer, texts: list[str]) -> None:
    """KL is measured at next-token positions: every neutral text needs at least two tokens."""
    short = [text for text in texts if len(tokenizer(text).input_ids) < 2]
    if short:
        raise CNAError(f"{len(short)} of the {len(texts)} neutral texts (first: {short[0][:40]!r}) are a single token: "
                       "KL on neutral text is measured on the next token after each prefix, so each text needs at "
                       "least two tokens; give sentences or paragraphs (one per line)")


def _discovery_prompts(positive, negative, needed: bool) -> tuple[list[str] | None, list[str] | None]:
    """The discovery prompts as lists when a capture will run (no saved statistics, or iterative rounds)."""
    positive = text_list(positive, "positive") if positive is not None else None
    negative = text_list(negative, "negative") if negative is not None else None
    if not needed:
        return None, None
    if positive is None or negative is None:
        raise CNAError("tune needs positive and negative discovery prompts (or saved statistics, and no iterative "
                       "rounds)")
    return text_list(positive, "positive"), text_list(negative, "negative")
