"""Circuit search: circuit size x multiplier x score under a KL budget.

The paper's fixed recipe (top 0.1% of neurons, multiplier 0) can remove a surface template and
leave the behavior: another template takes over. So size, strength and score are searched. It is
made cheap in three ways:

- one discovery serves every size: the circuits of one score are prefixes of one ranking;
- every setting is a row of the same batched passes: the candidate circuits are split into
  disjoint shells (rank bands k_{i-1}..k_i), and a row's multipliers put its multiplier on the
  shells its circuit covers and 1 elsewhere;
- KL on neutral text needs forward passes only, so it runs first, for every setting, and prunes
  the settings over the budget; successive halving then judges the rest on a few prompts with
  few tokens and spends full generations only on the most promising ones.

Optionally, iterative discovery captures the statistics again with the chosen circuit applied,
so that the neurons of the template that takes over are found, and tries their union.
"""
from __future__ import annotations

import datetime
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import evaluate
from .attribution import SCORES, attribute, validate_score
from .batching import uses_chat_template
from .capture import capture_contrast
from .pipeline import mlp_output_directions
from .settings import validate_layers
from .circuit import Circuit
from .errors import CNAError
from .models import get_adapter, model_name
from .stats import NeuronStats
from .steering import generate, steer
from .tune_result import Candidate, TuneResult, better_key, choose

ABLATE = (0.0, 0.5, -0.5, -1.0)
AMPLIFY = (1.5, 2.0, 3.0)
GOALS = ("remove", "induce")
DEFAULT_KL_BUDGET = 0.1  # nats of mean next-token KL on neutral text
DEFAULT_QUALITY_FLOOR = 0.9
# Circuit sizes as fractions of all MLP neurons, roughly log-spaced from 0.03% to 2%, with the
# paper's 0.1% among them so that its recipe is always one of the rows.
DEFAULT_FRACTIONS = (0.0003, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02)
PAPER_FRACTION = 0.001
_FIELDS = ("layers", "neurons", "scores", "deltas", "mean_positive", "mean_negative", "std_positive", "std_negative")


# ------------------------------------------------------------------------------------------- the grid


def size_grid(total_neurons: int, eligible: int, sizes: Sequence[float] | None = None) -> list[int]:
    """Circuit sizes in neurons, sorted and unique: values below 1 are fractions of all neurons, others counts."""
    counts = set()
    for value in DEFAULT_FRACTIONS if sizes is None else sizes:
        value = float(value)
        if not math.isfinite(value) or value <= 0 or (value >= 1 and value != int(value)):
            raise CNAError(f"circuit size {value!r} is neither a fraction in (0, 1) nor a whole number of neurons: "
                           "give e.g. 0.001 (0.1% of all neurons) or 50")
        counts.add(min(eligible, max(1, round(value * total_neurons)) if value < 1 else int(value)))
    if not counts:
        raise CNAError("no circuit sizes to search: give at least one size")
    return sorted(counts)


def multiplier_grid(goal: str, multipliers: Sequence[float] | None = None) -> list[float]:
    """The multipliers to search: ablations to remove a behavior, amplifications to induce it."""
    if goal not in GOALS:
        raise CNAError(f"unknown goal {goal!r}: choose 'remove' (ablate the circuit) or 'induce' (amplify it)")
    values = list(ABLATE if goal == "remove" else AMPLIFY) if multipliers is None else [float(m) for m in multipliers]
    if not values or not all(math.isfinite(value) for value in values):
        raise CNAError("multipliers must be finite numbers, e.g. 0,0.5,-0.5,-1")
    if 1.0 in values:
        raise CNAError("multiplier 1 is the unsteered model (always measured as the baseline): leave it out")
    return list(dict.fromkeys(values))


# ------------------------------------------------------------------------------ shells as batch rows


def _gather(circuits: Sequence[Circuit], picks: Sequence[tuple[int, int]], meta: dict) -> Circuit:
    """A circuit made of neuron `position` of circuit `index` for each (index, position) in `picks`."""
    values = {name: torch.stack([getattr(circuits[index], name)[position] for index, position in picks])
              for name in _FIELDS}
    return Circuit(meta=meta, **values)


def disjoint_shells(circuits: Sequence[Circuit | None]) -> tuple[list[Circuit], torch.Tensor]:
    """Split circuits into disjoint shells; returns the shells and membership [len(circuits), len(shells)].

    Circuit i is the union of the shells j with membership[i, j] (None is the empty circuit). For
    the prefixes of one ranking the shells are its rank bands; several rankings or unions split
    further, into the groups of neurons that belong to the same circuits.
    """
    owners: dict[tuple[int, int], list[int]] = {}
    source: dict[tuple[int, int], tuple[int, int]] = {}
    for index, circuit in enumerate(circuits):
        if circuit is None:
            continue
        for position, key in enumerate(zip(circuit.layers.tolist(), circuit.neurons.tolist())):
            owners.setdefault(key, []).append(index)
            source.setdefault(key, (index, position))
    groups: dict[tuple[int, ...], list[tuple[int, int]]] = {}
    for key, members in owners.items():
        groups.setdefault(tuple(members), []).append(key)
    membership = torch.zeros(len(circuits), len(groups), dtype=torch.bool)
    shells = []
    for column, (members, keys) in enumerate(groups.items()):
        picks = [source[key] for key in keys]
        shells.append(_gather(circuits, picks, dict(circuits[picks[0][0]].meta)))
        membership[list(members), column] = True
    return shells, membership


def multiplier_table(membership: torch.Tensor, multipliers: Sequence[float]) -> torch.Tensor:
    """Per-row multipliers [settings, shells]: each setting's multiplier on its circuit's shells, 1 elsewhere."""
    values = torch.tensor([float(m) for m in multipliers], dtype=torch.float32)[:, None]
    return torch.where(membership, values, torch.ones((), dtype=torch.float32))


def candidate_rows(candidates: Sequence[Candidate]) -> tuple[list[Circuit], torch.Tensor]:
    """Shells and per-row multipliers [len(candidates), shells] for a list of settings."""
    shells, membership = disjoint_shells([candidate.circuit for candidate in candidates])
    return shells, multiplier_table(membership, [candidate.multiplier for candidate in candidates])


# ---------------------------------------------------------------------------- batched measurements


def _log_probs(model, ids: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    device = get_adapter(model).body.get_input_embeddings().weight.device
    with torch.inference_mode():
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()


def batched_kl(model, tokenizer, shells: Sequence[Circuit], table: torch.Tensor, texts: Sequence[str], *,
               max_logits: int = 1 << 25, progress: bool = False) -> torch.Tensor:
    """Mean next-token KL(unsteered || steered) on `texts` for every row of `table` [settings, shells].

    The texts are repeated once per setting and run as rows of the same forwards, each row
    steered by its own multipliers. The mean is over every real next-token position of all texts,
    as in `evaluate.capability_metrics`. max_logits bounds the logits held at once (rows x tokens x vocab).
    """
    from tqdm.auto import tqdm

    if not shells:
        return torch.zeros(table.shape[0], dtype=torch.float64)
    encoded = tokenizer(list(texts), return_tensors="pt", padding=True)
    ids, attention = encoded.input_ids, encoded.attention_mask
    mask = (attention[:, 1:] * attention[:, :-1]).bool()
    vocab = model.get_output_embeddings().weight.shape[0]
    rows = max(1, max_logits // (ids.shape[1] * vocab))
    totals = torch.zeros(table.shape[0], dtype=torch.float64)
    with tqdm(total=table.shape[0] * ids.shape[0], desc="KL", unit="row", disable=not progress) as bar:
        for first in range(0, ids.shape[0], rows):
            texts_here = list(range(first, min(first + rows, ids.shape[0])))
            reference = _log_probs(model, ids[texts_here], attention[texts_here])
            pairs = [(setting, text) for setting in range(table.shape[0]) for text in range(len(texts_here))]
            for start in range(0, len(pairs), rows):
                settings = [setting for setting, _ in pairs[start:start + rows]]
                local = [text for _, text in pairs[start:start + rows]]
                chosen = [texts_here[text] for text in local]
                with steer(model, list(shells), multipliers=table[settings]):
                    steered = _log_probs(model, ids[chosen], attention[chosen])
                base = reference[local]
                kl = (base.exp() * (base - steered)).sum(-1) * mask[chosen]
                totals.index_add_(0, torch.tensor(settings), kl.sum(-1).double())
                bar.update(len(settings))
    return (totals / mask.sum()).clamp_min(0.0)


def _resolve_judge(behavior: str | Callable[[str], bool | float]) -> Callable[[str], bool | float]:
    if callable(behavior):
        return behavior
    judge = evaluate.BEHAVIORS.get(behavior)  # looked up at call time: judges added to BEHAVIORS are found
    if judge is None:
        raise CNAError(f"unknown behavior {behavior!r}: choose one of {', '.join(evaluate.BEHAVIORS)} "
                       "or pass a callable text -> bool")
    return judge


# ------------------------------------------------------------------------------------------ search


@dataclass
class _Search:
    """The model, prompts and settings of one search, and the measurements it runs."""

    model: object
    tokenizer: object
    eval_prompts: list[str]
    judge: Callable[[str], bool | float]
    goal: str
    kl_budget: float
    quality_floor: float
    neutral: list[str]
    max_new_tokens: int
    rungs: list[tuple[int, int]]
    eta: int
    batch_size: int
    chat_template: bool | str | None
    progress: bool
    tokens_spent: int = 0
    baseline: Candidate = field(default_factory=lambda: Candidate(None, 0, 1.0, None, stage="baseline"))

    def measure_kl(self, candidates: list[Candidate]) -> None:
        shells, table = candidate_rows(candidates)
        values = batched_kl(self.model, self.tokenizer, shells, table, self.neutral, progress=self.progress)
        for candidate, value in zip(candidates, values.tolist()):
            candidate.kl = value if math.isfinite(value) else math.inf
            if not candidate.kl <= self.kl_budget:
                candidate.stage = "pruned by KL"

    def judge_rows(self, candidates: list[Candidate], n_prompts: int, tokens: int, stage: str) -> None:
        """Generate for every candidate on the first `n_prompts` eval prompts, as rows of one batched run."""
        prompts = self.eval_prompts[:n_prompts]
        shells, table = candidate_rows(candidates)
        steering = {"circuits": shells, "multipliers": table.repeat_interleave(n_prompts, 0)} if shells else {}
        texts = generate(self.model, self.tokenizer, prompts * len(candidates), max_new_tokens=tokens,
                         batch_size=self.batch_size, chat_template=self.chat_template, progress=self.progress,
                         **steering)
        self.tokens_spent += len(texts) * tokens
        for index, candidate in enumerate(candidates):
            outputs = texts[index * n_prompts:(index + 1) * n_prompts]
            candidate.behavior_rate = evaluate.behavior_rate(outputs, self.judge)
            candidate.quality = sum(evaluate.quality(text) for text in outputs) / len(outputs)
            candidate.prompts, candidate.new_tokens, candidate.stage = n_prompts, tokens, stage
            candidate.tokens_spent += n_prompts * tokens
            candidate.outputs = outputs

    def halve(self, candidates: list[Candidate], label: str, forced: Sequence[Candidate] = ()) -> None:
        """Successive halving over the settings within the KL budget; `forced` join the last rung."""
        alive = [candidate for candidate in candidates if candidate.kl <= self.kl_budget]
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
                ranked = better_key(self.goal)  # settings under the quality floor go last
                alive.sort(key=lambda candidate: (candidate.quality < self.quality_floor, *ranked(candidate)))
                alive = alive[:max(min(4, len(alive)), math.ceil(len(alive) / self.eta))]
        self.baseline.final = True
        self.baseline.stage = "baseline"


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


def _grid(stats: NeuronStats, scores: Sequence[str], sizes: list[int], multipliers: list[float],
          exclude_layers: list[int], total_neurons: int, meta: dict) -> list[Candidate]:
    """One candidate per (score, size, multiplier): the circuits of a score are prefixes of its ranking.

    A circuit that an earlier score already gave (t and d rank alike when both prompt sets have the
    same size) is measured once, under the earlier score.
    """
    candidates, seen = [], set()
    for score in scores:
        for size in sizes:
            circuit = attribute(stats, top_k=size, score=score, exclude_layers=exclude_layers,
                                total_neurons=total_neurons, meta=meta)
            members = frozenset(zip(circuit.layers.tolist(), circuit.neurons.tolist()))
            if members not in seen:
                seen.add(members)
                candidates += [Candidate(score, size, multiplier, circuit) for multiplier in multipliers]
    return candidates


def _union(base: Circuit, added: Circuit, meta: dict) -> Circuit:
    values = {name: torch.cat([getattr(base, name), getattr(added, name)]) for name in _FIELDS}
    return Circuit(meta=meta, **values)


def _taken_mask(circuit: Circuit, layers: Sequence[int], width: int) -> torch.Tensor:
    """Bool mask [len(layers), width] of the circuit's neurons (never selected again)."""
    mask = torch.zeros(len(layers), width, dtype=torch.bool)
    rows = {layer: row for row, layer in enumerate(layers)}
    for layer, neuron in zip(circuit.layers.tolist(), circuit.neurons.tolist()):
        if layer in rows:
            mask[rows[layer], neuron] = True
    return mask


def rediscover(model, tokenizer, chosen: Candidate, positive: Sequence[str], negative: Sequence[str], *,
               sizes: list[int], multipliers: list[float], round_number: int, capture: dict, applied: float,
               exclude_layers: list[int], total_neurons: int) -> list[Candidate]:
    """Capture again with the chosen circuit applied; candidates are its union with the new top neurons.

    With the first template's neurons steered away, the contrast shows the neurons of the template
    that takes over; the chosen circuit's own neurons are never selected again.
    """
    with steer(model, chosen.circuit, applied):
        stats = capture_contrast(model, tokenizer, positive, negative, **capture)
    taken = _taken_mask(chosen.circuit, stats.layers, stats.width)
    eligible = int((~taken).sum()) - stats.width * sum(layer in exclude_layers for layer in stats.layers)
    candidates = []
    for size in sorted({min(size, eligible) for size in sizes if eligible > 0}):
        added = attribute(stats, top_k=size, score=chosen.score, exclude_layers=exclude_layers, universal=taken,
                          total_neurons=total_neurons)
        meta = {**chosen.circuit.meta, "top_k": len(chosen.circuit) + size,
                "iterative": {"round": round_number, "base_size": len(chosen.circuit), "added": size,
                              "applied_multiplier": applied}}
        union = _union(chosen.circuit, added, meta)
        candidates += [Candidate(chosen.score, len(union), m, union, round=round_number) for m in multipliers]
    return candidates


def _check_stats(stats: NeuronStats, model) -> None:
    adapter = get_adapter(model)
    recorded = stats.meta.get("fingerprint")
    shape_keys = ("model_type", "num_layers", "d_ff")
    here = {key: adapter.architecture()[key] for key in shape_keys}
    if recorded and {key: recorded.get(key) for key in shape_keys} != here:
        raise CNAError(f"these statistics were captured on {stats.meta.get('model', 'another model')} "
                       f"({ {key: recorded.get(key) for key in shape_keys} }), not on this model ({here}): pass that "
                       "model, or capture statistics on this one")
    if any(not 0 <= layer < adapter.num_layers for layer in stats.layers) or stats.width != max(adapter.widths):
        raise CNAError(f"these statistics ({len(stats.layers)} layers x {stats.width} neurons) do not fit this model "
                       f"({adapter.num_layers} layers x {max(adapter.widths)} neurons): capture them on this model")


def _circuit_meta(model, tokenizer, stats: NeuronStats, position: str, chat_template) -> dict:
    from . import __version__

    adapter = get_adapter(model)
    return {"model": model_name(model), "fingerprint": adapter.architecture(),
            "position": stats.meta.get("position", position),
            "chat_template": stats.meta.get("chat_template", uses_chat_template(tokenizer, chat_template)),
            "universal_filter": False, "cna_fast_version": __version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _paper_default(candidates: Sequence[Candidate], total_neurons: int, goal: str) -> Candidate | None:
    """The paper's recipe (diff score, top 0.1%, multiplier 0) when it is in the grid: always measured in full."""
    size = max(1, round(PAPER_FRACTION * total_neurons))
    return next((candidate for candidate in candidates if goal == "remove" and candidate.score == "diff"
                 and candidate.size == size and candidate.multiplier == 0.0), None)


def _chosen_circuit(model, chosen: Candidate | None, stats: NeuronStats, summary: dict) -> Circuit | None:
    """The chosen circuit, with its multiplier and the search's summary in its metadata and CAA directions."""
    if chosen is None:
        return None
    source = chosen.circuit
    meta = {**source.meta, "multiplier": chosen.multiplier, "tune": summary}
    layers, directions = mlp_output_directions(model, stats)
    return Circuit(meta=meta, caa_layers=layers, caa_directions=directions,
                   **{name: getattr(source, name) for name in _FIELDS})


def _validated(eval_prompts, kl_budget: float, quality_floor: float, scores: Sequence[str],
               max_new_tokens: int, batch_size: int, iterative: int) -> tuple[list[str], list[str]]:
    eval_prompts = [str(prompt) for prompt in eval_prompts]
    if not eval_prompts or not all(prompt.strip() for prompt in eval_prompts):
        raise CNAError("tune needs held-out eval prompts that show the behavior (none given, or an empty one)")
    if not (math.isfinite(kl_budget) and kl_budget > 0):
        raise CNAError(f"kl_budget must be a positive number of nats, got {kl_budget!r} (e.g. 0.1)")
    if not 0.0 <= quality_floor <= 1.0:
        raise CNAError(f"quality_floor must be in [0, 1], got {quality_floor!r}")
    scores = [validate_score(score) for score in scores]
    if not scores:
        raise CNAError(f"give at least one score to search: {', '.join(SCORES)}")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CNAError(f"{name} must be a positive integer, got {value!r}")
    if isinstance(iterative, bool) or not isinstance(iterative, int) or iterative < 0:
        raise CNAError(f"iterative must be a number of rounds (0 or more), got {iterative!r}")
    return eval_prompts, list(dict.fromkeys(scores))


def tune(model, tokenizer, positive: Sequence[str] | None = None, negative: Sequence[str] | None = None,
         eval_prompts: Sequence[str] = (), *, behavior: str | Callable[[str], bool | float] = "refusal",
         goal: str = "remove", kl_budget: float = DEFAULT_KL_BUDGET, quality_floor: float = DEFAULT_QUALITY_FLOOR,
         sizes: Sequence[float] | None = None, multipliers: Sequence[float] | None = None,
         scores: Sequence[str] = SCORES, neutral: Sequence[str] | None = None, stats: NeuronStats | None = None,
         iterative: int = 0, max_new_tokens: int = 40, rungs: int = 2, eta: int = 3, position: str = "last",
         exclude_layers: Sequence[int] = (), chat_template: bool | str | None = None, batch_size: int = 32,
         progress: bool = True) -> TuneResult:
    """Search circuit size x multiplier x score for the setting that best removes (or induces) a behavior.

    positive / negative: discovery prompts (or `stats`, saved statistics of them: one discovery
        serves every size). eval_prompts: held-out prompts whose answers show the behavior.
    behavior: a name in `evaluate.BEHAVIORS` or a callable text -> bool (or score in [0, 1]).
    goal: "remove" (multipliers 0, 0.5, -0.5, -1) or "induce" (1.5, 2, 3); `multipliers` overrides.
    kl_budget: the most mean next-token KL (nats) on `neutral` text (default: the bundled paragraphs).
    quality_floor: the least mean `evaluate.quality` of the chosen setting's answers.
    sizes: fractions of all neurons (< 1) or neuron counts; default 0.03% to 2%, log-spaced.
    iterative: rounds of re-discovery with the chosen circuit applied (union with the new neurons).
    rungs / eta: successive halving; every rung keeps 1/eta of the settings, the last one is full.
    Chooses the best behavior rate within the KL budget and quality floor, the smallest circuit among ties.
    """
    judge = _resolve_judge(behavior)
    eval_prompts, scores = _validated(eval_prompts, kl_budget, quality_floor, scores, max_new_tokens, batch_size,
                                      iterative)
    adapter = get_adapter(model)
    excluded = validate_layers(exclude_layers, adapter.num_layers)
    capture = {"layers": [layer for layer in range(adapter.num_layers) if layer not in excluded], "reduction": position,
               "chat_template": chat_template, "batch_size": batch_size, "progress": progress}
    positive, negative = _discovery_prompts(positive, negative, stats is None or iterative > 0)
    if stats is None:
        stats = capture_contrast(model, tokenizer, positive, negative, **capture)
    _check_stats(stats, model)
    eligible = stats.width * sum(layer not in excluded for layer in stats.layers)
    size_list = size_grid(adapter.num_neurons, eligible, sizes)
    multiplier_list = multiplier_grid(goal, multipliers)
    search = _Search(model, tokenizer, eval_prompts, judge, goal, float(kl_budget), float(quality_floor),
                     list(neutral) if neutral is not None else evaluate.bundled_neutral_texts(), max_new_tokens,
                     halving_rungs(len(eval_prompts), max_new_tokens, rungs, eta), eta, batch_size, chat_template,
                     progress)
    search.baseline.kl = 0.0
    meta = _circuit_meta(model, tokenizer, stats, position, chat_template)
    candidates = _grid(stats, scores, size_list, multiplier_list, excluded, adapter.num_neurons, meta)
    search.measure_kl(candidates)
    reference = _paper_default(candidates, adapter.num_neurons, goal)
    search.halve(candidates, "", forced=[reference] if reference is not None else [])
    chosen = choose(candidates, search.kl_budget, quality_floor, goal)
    for round_number in range(1, iterative + 1):
        if chosen is None:
            break
        candidates += _iterative_round(search, chosen, round_number, positive, negative, size_list, multiplier_list,
                                       capture, excluded)
        chosen = choose(candidates, search.kl_budget, quality_floor, goal)
    result = TuneResult(candidates=candidates, baseline=search.baseline, chosen=chosen, behavior=_name(behavior),
                        goal=goal, kl_budget=float(kl_budget), quality_floor=float(quality_floor),
                        total_neurons=adapter.num_neurons, tokens_spent=search.tokens_spent,
                        full_grid_tokens=(len(candidates) + 1) * len(eval_prompts) * max_new_tokens)
    result.circuit = _chosen_circuit(model, chosen, stats, result.summary_meta())
    return result


def _iterative_round(search: "_Search", chosen: Candidate, round_number: int, positive: list[str],
                     negative: list[str], sizes: list[int], multipliers: list[float], capture: dict,
                     excluded: list[int]) -> list[Candidate]:
    """One round of iterative discovery: capture with `chosen` applied, measure the unions with the new neurons."""
    applied = 0.0 if search.goal == "remove" else chosen.multiplier
    found = rediscover(search.model, search.tokenizer, chosen, positive, negative, sizes=sizes,
                       multipliers=multipliers, round_number=round_number, capture=capture, applied=applied,
                       exclude_layers=excluded, total_neurons=get_adapter(search.model).num_neurons)
    search.measure_kl(found)
    search.halve(found, f"round {round_number} ")
    return found


def _discovery_prompts(positive, negative, needed: bool) -> tuple[list[str] | None, list[str] | None]:
    """The discovery prompts as lists when a capture will run (no saved statistics, or iterative rounds)."""
    if not needed:
        return None, None
    if positive is None or negative is None:
        raise CNAError("tune needs positive and negative discovery prompts (or saved statistics, and no iterative "
                       "rounds)")
    return list(positive), list(negative)


def _name(behavior: str | Callable) -> str:
    return behavior if isinstance(behavior, str) else getattr(behavior, "__name__", "custom")
