"""Circuit search: circuit size x multiplier x score under a KL budget (`tune`).

The paper's fixed recipe (top 0.1% of neurons, multiplier 0) can remove a surface template and
leave the behavior: another template takes over. So size, strength and score are searched. It is
made cheap enough for a CPU in four ways:

- one discovery serves every size: the circuits of one score are prefixes of one ranking;
- every setting is a row of the same batched passes (see `grid`: disjoint shells as rows);
- KL on neutral text needs forward passes only, and rises with circuit size and with |1 - m|, so
  bisection along that order decides the whole grid's side of the budget from a few settings,
  each measured on a few texts first and on all of them only near the budget (see `pruning`);
- only the settings within the budget that nothing larger or stronger dominates are generated:
  a screen on about half the prompts with most of the tokens (enough for a refusal to show),
  then the best `finalists` in full, with the unsteered baseline and the paper's recipe.

A time budget cuts the later stages to fit and reports what it left out; `strategy="full"`
measures and generates the whole grid instead (the yardstick the pruning is checked against).
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
from ..batching import encode_prompts
from ..capture import capture_contrast
from ..circuit import Circuit
from ..errors import CircuitWeightsWarning, CNAError, one_of, positive_int, real_number, text_list
from ..evaluation import bundled_neutral_texts, judge_answers, quality, resolve_behavior
from .._io import printable
from ..models import get_adapter, is_moe
from ..models.content import weights_differ
from ..pipeline import capture_layers, mlp_output_directions, provenance
from ..settings import CaptureSettings, with_options
from ..stats import MoEStats, NeuronStats, Stats
from ..steering import GenerationSettings, generate, steer
from ..steering.scale import check_multiplier_fits
from .grid import SearchSpace, candidate_rows, grid, paper_default, size_grid
from .measure import NeutralKL, SearchClock
from .pruning import OVER, WITHIN, decide_budget, frontier, next_milder, shrink
from .result import Candidate, TuneResult, better_key, choose

DEFAULT_KL_BUDGET = 0.1  # nats of mean next-token KL on neutral text
DEFAULT_QUALITY_FLOOR = 0.9
STRATEGIES = ("frontier", "full")
# A first KL estimate decides a setting's side of the budget when it is at least this factor away from it.
CLEAR_FACTOR = 2.0
SKIPPED = "skipped (time budget)"


@dataclass(frozen=True)
class SearchBudget:
    """What the search may cost.

    kl_budget: the most mean next-token KL (nats) a setting may cost on `neutral` text (default: the
        bundled paragraphs); settings over it are never generated.
    minutes: a time budget for the search after discovery (None: none); the stages are cut to fit and
        the result lists what was left unmeasured.
    strategy: "frontier" (bisection on KL, then only the settings nothing stronger dominates) or
        "full" (KL of every setting on every text, every setting within the budget screened and
        generated in full: the yardstick, and the screen's rank agreement with full runs).
    finalists: settings generated in full after the screen. first_texts: neutral texts of a first KL
        estimate; settings within a factor of 2 of the budget are measured on all of them.
    """

    kl_budget: float = DEFAULT_KL_BUDGET
    neutral: tuple[str, ...] | None = None
    minutes: float | None = None
    strategy: str = "frontier"
    finalists: int = 4
    first_texts: int = 4

    def __post_init__(self) -> None:
        budget = real_number(self.kl_budget, "kl_budget")
        if not (math.isfinite(budget) and budget > 0):
            raise CNAError(f"kl_budget must be a positive number of nats, got {self.kl_budget!r} (e.g. 0.1)")
        if self.neutral is not None:
            neutral = tuple(text_list(self.neutral, "neutral"))
            if not neutral or not all(text.strip() for text in neutral):
                raise CNAError("neutral must hold non-empty texts (or None for the bundled paragraphs)")
            object.__setattr__(self, "neutral", neutral)
        if self.minutes is not None:
            minutes = real_number(self.minutes, "minutes")
            if not (math.isfinite(minutes) and minutes > 0):
                raise CNAError(f"the time budget must be a positive number of minutes, got {self.minutes!r}")
        one_of(self.strategy, STRATEGIES, "strategy", "frontier: prune by order; full: measure every setting")
        positive_int(self.finalists, "finalists")
        positive_int(self.first_texts, "first_texts")

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


def screen_size(n_prompts: int, max_new_tokens: int) -> tuple[int, int]:
    """(prompts, new tokens) of the screen: about half the prompts (at least 8) and 60% of the tokens (at
    least 16), so that a refusal has started in most answers and a few prompts do not decide the rank."""
    return (min(n_prompts, max(8, math.ceil(n_prompts / 2))),
            min(max_new_tokens, max(16, math.ceil(0.6 * max_new_tokens))))


@dataclass
class _Measurements:
    """The model, prompts and settings of one search, what each measurement costs, and the measurements:
    KL (each setting's side of the budget) and batched generations (behavior rate and quality)."""

    model: object
    tokenizer: object
    eval_prompts: list[str]
    space: SearchSpace
    budget: SearchBudget
    judging: Judging
    generation: GenerationSettings
    progress: bool
    tokens_spent: int = 0
    baseline: Candidate = field(default_factory=lambda: Candidate(None, 0, 1.0, None, stage="baseline"))

    def __post_init__(self) -> None:
        self.neutral = NeutralKL(self.model, self.tokenizer, self.budget.neutral_texts(),
                                 chunk_texts=self.budget.first_texts)
        self.clock = SearchClock(self.budget.minutes, self.progress)
        self.screen = screen_size(len(self.eval_prompts), self.generation.max_new_tokens)
        lengths = [len(row) for row in encode_prompts(self.tokenizer, self.eval_prompts,
                                                      self.generation.chat_template)]
        self.prompt_tokens = sum(lengths) / len(lengths)
        self.baseline.kl, self.baseline.over_budget = 0.0, False
        with self.clock.timing("forward", self.neutral.tokens()):
            for chunk in range(len(self.neutral.chunks)):  # the unsteered pass, kept for every setting
                self.neutral.reference(chunk)

    # ------------------------------------------------------------------------------------ costs
    def generation_cost(self, settings: int, prompts: int, tokens: int) -> float:
        return self.clock.cost("generate", settings * prompts * (self.prompt_tokens + tokens))

    def full_run_cost(self, settings: int) -> float:
        """Seconds to generate `settings` settings on every eval prompt with every new token."""
        return self.generation_cost(settings, len(self.eval_prompts), self.generation.max_new_tokens)

    def remaining(self, pending: int, screened: int, finalists: int) -> float:
        """Seconds the rest of the search should take: `pending` settings still to place on either side of
        the KL budget (about 2 bisection probes per multiplier and score), `screened` to screen, `finalists`
        to generate in full (and their KL on every text)."""
        probes = min(pending, 2 * len(self.space.multiplier_list()) * len(self.space.scores)) if pending else 0
        first = self.neutral.tokens(self.budget.first_texts)
        kl = self.clock.cost("forward", probes * (first + 0.3 * self.neutral.tokens()) + finalists
                             * self.neutral.tokens() * 0.5)
        screen = self.generation_cost(screened, *self.screen)
        return kl + screen + self.full_run_cost(finalists + 1)

    def full_grid_seconds(self, settings: int) -> float:
        """Every setting's KL on every text and every setting generated in full, at the rates measured."""
        return (self.clock.cost("forward", settings * self.neutral.tokens())
                + self.full_run_cost(settings + 1))

    # ------------------------------------------------------------------------------------- KL
    def measure_kl(self, candidates: list[Candidate], texts: int | None = None) -> None:
        """KL of `candidates` as rows of the same forwards, on the first `texts` neutral texts (all when None)."""
        if not candidates:
            return
        shells, table = candidate_rows(candidates)
        with self.clock.timing("forward", len(candidates) * self.neutral.tokens(texts)):
            values = self.neutral.measure(shells, table, texts)
        for candidate, value in zip(candidates, values.tolist()):
            candidate.kl = value if math.isfinite(value) else math.inf
            candidate.kl_texts = self.neutral.texts_used(texts)
            candidate.over_budget = not candidate.kl <= self.budget.kl_budget

    def probe(self, candidate: Candidate) -> str:
        """One setting's side of the KL budget: a first estimate on a few texts, all texts when it is close."""
        budget, first = self.budget.kl_budget, self.budget.first_texts
        if self.neutral.texts_used(first) < self.neutral.texts:
            self.measure_kl([candidate], first)
            if not budget / CLEAR_FACTOR <= candidate.kl <= budget * CLEAR_FACTOR:
                return OVER if candidate.over_budget else WITHIN
        self.measure_kl([candidate])
        return OVER if candidate.over_budget else WITHIN

    def place(self, candidates: list[Candidate], reserve: float) -> list[Candidate]:
        """Decide every setting's side of the KL budget; returns those within it. `reserve`: seconds to keep
        for the generations."""
        if self.budget.strategy == "full":
            self.clock.show(self.full_grid_seconds(len(candidates)))
            self.measure_kl(candidates)
        else:
            def stop() -> bool:
                pending = sum(candidate.over_budget is None for candidate in candidates)
                self.clock.show(self.remaining(pending, 2 * len(self.space.multiplier_list()),
                                               self.budget.finalists))
                return self.clock.left() < reserve

            verdicts = decide_budget(candidates, self.probe, stop)
            for candidate in candidates:
                verdict = verdicts.get(id(candidate))
                if verdict is None:
                    candidate.stage = SKIPPED
                elif candidate.kl is None:  # decided by the order, from a setting that was measured
                    candidate.over_budget = verdict == OVER
                    candidate.stage = "pruned by KL (implied)" if verdict == OVER else "within budget (implied)"
        for candidate in candidates:
            if candidate.over_budget and candidate.stage == "grid":
                candidate.stage = "pruned by KL"
        return [candidate for candidate in candidates if candidate.over_budget is False]

    # ---------------------------------------------------------------------------- generation
    def judge_rows(self, candidates: list[Candidate], n_prompts: int, tokens: int, stage: str) -> None:
        """Generate for every candidate on the first `n_prompts` eval prompts, as rows of one batched run."""
        prompts = self.eval_prompts[:n_prompts]
        shells, table = candidate_rows(candidates)
        steering = {"circuits": shells, "multipliers": table.repeat_interleave(n_prompts, 0)} if shells else {}
        cost = len(candidates) * n_prompts * (self.prompt_tokens + tokens)
        with self.clock.timing("generate", round(cost)):
            texts = generate(self.model, self.tokenizer, prompts * len(candidates), progress=False,
                             batch_context=lambda rows: self.clock.ticking(),
                             generation=dataclasses.replace(self.generation, max_new_tokens=tokens), **steering)
        self.tokens_spent += len(texts) * tokens
        judge = resolve_behavior(self.judging.behavior)
        for index, candidate in enumerate(candidates):
            outputs = texts[index * n_prompts:(index + 1) * n_prompts]
            rate = sum(judge_answers(judge, prompts, outputs)) / len(outputs)
            mean_quality = sum(quality(text) for text in outputs) / len(outputs)
            candidate.tokens_spent += n_prompts * tokens
            if stage.endswith("screen"):
                candidate.screen_rate, candidate.screen_quality = rate, mean_quality
            if (n_prompts, tokens) == (len(self.eval_prompts), self.generation.max_new_tokens):
                candidate.behavior_rate, candidate.quality = rate, mean_quality  # a screen this size is a full run
                candidate.prompts, candidate.new_tokens, candidate.outputs = n_prompts, tokens, outputs
            candidate.stage = stage

class _Search(_Measurements):
    """The stages of one search: place every setting on the KL budget, screen, shrink, generate in full."""

    def screen_rank(self, candidates: list[Candidate]) -> list[Candidate]:
        """Best first by the screen: settings under the quality floor last, then the goal's order."""
        ranked = better_key(self.space.goal)
        return sorted(candidates, key=lambda c: (c.screen_quality < self.judging.quality_floor,
                                                 *ranked(dataclasses.replace(c, behavior_rate=c.screen_rate,
                                                                             kl=c.kl or 0.0))))

    def run_screen(self, within: list[Candidate], label: str) -> list[Candidate]:
        """Screen the undominated settings (and, for any under the quality floor, the next milder ones), then
        look below the best one for the smallest, mildest setting that screens as well; returns the finalists.
        When nothing is dominated and few settings are left, all of them are finalists without a screen."""
        finalists = self.budget.finalists
        chosen = list(within) if self.budget.strategy == "full" else frontier(within)
        for candidate in within:
            if candidate not in chosen:
                candidate.stage = "dominated"
        if len(chosen) == len(within) <= finalists and self.budget.strategy != "full":
            return chosen
        fitting = self.fit_screen(chosen)
        if not fitting:  # no time for a screen: the strongest undominated settings go straight to the final run
            return keep_strongest(chosen, finalists)
        chosen = fitting
        screened, tried = [], set()
        while chosen:
            self.judge_rows(chosen, *self.screen, f"{label}screen")
            screened += chosen
            tried |= {id(candidate) for candidate in chosen}
            failed = [c for c in chosen if c.screen_quality < self.judging.quality_floor]
            chosen = list({id(m): m for c in failed for m in next_milder(c, within, tried)}.values())
            chosen = self.fit_screen(chosen) if chosen else []
        if self.budget.strategy == "full" or not screened:
            return screened
        best = self.screen_rank(screened)[0]
        sign = 1.0 if self.space.goal == "remove" else -1.0

        def as_good(candidate: Candidate) -> bool:
            if id(candidate) not in tried:
                self.judge_rows([candidate], *self.screen, f"{label}screen")
                screened.append(candidate)
                tried.add(id(candidate))
            return (candidate.screen_quality >= self.judging.quality_floor
                    and sign * candidate.screen_rate <= sign * best.screen_rate)

        needed = self.full_run_cost(finalists + 1) + self.generation_cost(1, *self.screen)
        shrink(best, within, as_good, stop=lambda: self.clock.left() < needed)
        return self.screen_rank(screened)[:finalists]

    def fit_screen(self, chosen: list[Candidate]) -> list[Candidate]:
        """As many of `chosen` as the time budget allows before the final run (the strongest first)."""
        if math.isinf(self.clock.left()):
            return chosen
        per_setting = self.generation_cost(1, *self.screen)
        fits = (max(0, int((self.clock.left() - self.full_run_cost(self.budget.finalists + 1)) // per_setting))
                if per_setting > 0 else len(chosen))
        return keep_strongest(chosen, fits) if fits else []  # with no room the caller sends them to the final run

    def run_final(self, finalists: list[Candidate], label: str, with_baseline: bool) -> None:
        """Generate the finalists in full (with the baseline), as the time budget allows, and measure their KL
        on every neutral text."""
        fits = len(finalists)
        if not math.isinf(self.clock.left()):  # at least one, so that a search always has a choice to offer
            fits = max(1, int(self.clock.left() // self.full_run_cost(1)) - int(with_baseline))
            for candidate in finalists[fits:]:
                candidate.stage = SKIPPED
        finalists = finalists[:fits]
        self.measure_kl([candidate for candidate in finalists if candidate.kl_texts < self.neutral.texts])
        pending = [candidate for candidate in ([self.baseline] if with_baseline else []) + finalists
                   if candidate.prompts < len(self.eval_prompts)]  # not yet generated in full (by the screen)
        if pending:
            self.judge_rows(pending, len(self.eval_prompts), self.generation.max_new_tokens, f"{label}final")
        for candidate in finalists:
            candidate.final, candidate.stage = True, f"{label}final"
        self.baseline.final, self.baseline.stage = True, "baseline"

    def search(self, candidates: list[Candidate], label: str = "", forced: Sequence[Candidate] = ()) -> None:
        """Place the settings on the KL budget, screen the undominated ones, generate the best in full."""
        # KL placement stops while the baseline and two settings can still be generated in full
        reserve = self.full_run_cost(3)
        within = self.place(candidates, reserve)
        self.clock.show(self.remaining(0, len(frontier(within)), self.budget.finalists))
        finalists = self.run_screen(within, label)
        finalists += [candidate for candidate in forced if candidate not in finalists]
        self.clock.show(self.remaining(0, 0, len(finalists)))
        self.run_final(finalists, label, with_baseline=label == "")
        self.clock.show(0.0)

    def choose(self, candidates: list[Candidate]) -> Candidate | None:
        return choose(candidates, self.budget.kl_budget, self.judging.quality_floor, self.space.goal)


def keep_strongest(candidates: list[Candidate], count: int) -> list[Candidate]:
    """The `count` settings closest to the KL budget (the strongest), first; the rest are skipped for time."""
    ordered = sorted(candidates, key=lambda c: -(c.kl or 0.0))
    for candidate in ordered[count:]:
        candidate.stage = SKIPPED
    return ordered[:count]


def tune(model, tokenizer, positive: Sequence[str] | None = None, negative: Sequence[str] | None = None,
         eval_prompts: Sequence[str] = (), *, space: SearchSpace | None = None, budget: SearchBudget | None = None,
         judging: Judging | None = None, capture: CaptureSettings | None = None,
         generation: GenerationSettings | None = None, stats: Stats | None = None, progress: bool = True,
         **options: Any) -> TuneResult:
    """Search circuit size x multiplier x score for the setting that best removes (or induces) a behavior.

    positive / negative: discovery prompts (or `stats`, saved statistics of them: one discovery
        serves every size). eval_prompts: held-out prompts whose answers show the behavior.
    space: what is searched (sizes, multipliers, scores, goal, exclude_layers, iterative rounds).
    budget: what it may cost (kl_budget on neutral text, minutes, strategy, finalists).
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
    reference = paper_default(candidates, adapter.num_neurons, space.goal)
    search.search(candidates, forced=[reference] if reference is not None else [])
    chosen = search.choose(candidates)
    for round_number in range(1, space.iterative + 1):
        if chosen is None:
            break
        candidates += _iterative_round(search, chosen, round_number, positive, negative, sizes, capture)
        chosen = search.choose(candidates)
    search.clock.close()
    result = TuneResult(candidates=candidates, baseline=search.baseline, chosen=chosen, behavior=judging.name,
                        goal=space.goal, kl_budget=float(budget.kl_budget), quality_floor=float(judging.quality_floor),
                        total_neurons=adapter.num_neurons, tokens_spent=search.tokens_spent,
                        full_grid_tokens=(len(candidates) + 1) * len(eval_prompts) * generation.max_new_tokens,
                        seconds=search.clock.elapsed(), full_grid_seconds=round(search.full_grid_seconds(
                            len(candidates)), 1), time_budget=budget.minutes)
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
    search.search(found, f"round {round_number} ")
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
