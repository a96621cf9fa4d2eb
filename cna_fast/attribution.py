"""Score neurons from contrast statistics, select the circuit, filter universal neurons."""
from __future__ import annotations

import datetime
import itertools
import json
import hashlib
import numbers
import os
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Sequence

import torch

from .capture import (Capturer, Checkpoint, capture_contrast, uses_chat_template, validate_layers,
                      validate_position)
from .circuit import Circuit
from .errors import CNAError
from .models import get_adapter, model_name
from .stats import NEGATIVE, POSITIVE, NeuronStats

SCORES = ("diff", "t", "d")
DEFAULT_TOP_FRAC = 0.001
_TINY = 1e-12


def validate_score(score: str) -> str:
    if score not in SCORES:
        raise CNAError(f"unknown score {score!r}: choose one of {', '.join(SCORES)} (diff = mean difference, "
                       "t = Welch t, d = Cohen's d)")
    return score


def score_neurons(stats: NeuronStats, score: str = "diff") -> torch.Tensor:
    """Signed score per neuron [layers, width], positive where the positive group is higher.

    diff: mean(positive) - mean(negative), the paper's score.
    t: Welch's t, the difference over its standard error.
    d: Cohen's d, the difference over the pooled standard deviation.
    """
    validate_score(score)
    diff = stats.mean[:, POSITIVE] - stats.mean[:, NEGATIVE]
    if score == "diff":
        return diff
    n_pos, n_neg = float(stats.count[POSITIVE]), float(stats.count[NEGATIVE])
    if min(n_pos, n_neg) < 2:
        raise CNAError(f"score {score!r} needs at least 2 prompts per side (got {int(n_pos)} positive, "
                       f"{int(n_neg)} negative); use score='diff' or add prompts")
    variance = stats.variance(ddof=1)
    var_pos, var_neg = variance[:, POSITIVE], variance[:, NEGATIVE]
    if score == "t":
        spread = (var_pos / n_pos + var_neg / n_neg).sqrt()
    else:
        spread = (((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2)).sqrt()
    return diff / spread.clamp_min(_TINY)


def resolve_top_k(top_k: int | None, top_frac: float | None, total_neurons: int, eligible: int) -> int:
    """How many neurons to select: `top_k`, or `top_frac` of all the model's neurons (at least 1)."""
    if top_k is None:
        frac = DEFAULT_TOP_FRAC if top_frac is None else float(top_frac)
        if not 0.0 < frac <= 1.0:
            raise CNAError(f"top_frac must be in (0, 1], got {top_frac}: 0.001 selects the top 0.1%")
        top_k = max(1, round(frac * total_neurons))
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1:
        raise CNAError(f"top_k must be a positive integer, got {top_k!r}")
    top_k = int(top_k)
    if top_k > eligible:
        raise CNAError(f"top_k={top_k} is more than the {eligible} neurons that can be selected "
                       f"(the model has {total_neurons} MLP neurons); choose a smaller top_k")
    return top_k


def select_neurons(scores: torch.Tensor, top_k: int, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Flat indices of the `top_k` largest |scores| over all layers; ties go to the lower index.

    eligible: optional bool mask like `scores`; False entries are never selected.
    """
    magnitude = scores.abs().flatten().nan_to_num(nan=-1.0)
    if eligible is not None:
        magnitude = torch.where(eligible.flatten(), magnitude, torch.full_like(magnitude, -torch.inf))
    order = torch.sort(magnitude, descending=True, stable=True).indices
    return order[:top_k]


def attribute(stats: NeuronStats, *, top_k: int | None = None, top_frac: float | None = DEFAULT_TOP_FRAC,
              score: str = "diff", exclude_layers: Iterable[int] = (), universal: torch.Tensor | None = None,
              total_neurons: int | None = None, meta: dict | None = None) -> Circuit:
    """Build a circuit from contrast statistics: score, rank globally by |score|, take the top.

    universal: optional bool mask [len(stats.layers), width] of neurons never to select.
    total_neurons: the model's neuron count for `top_frac` (default: the captured neurons).
    """
    scores = score_neurons(stats, score)
    excluded = set(int(layer) for layer in exclude_layers)
    eligible = torch.tensor([layer not in excluded for layer in stats.layers], device=scores.device)[:, None]
    eligible = eligible.expand_as(scores)
    if universal is not None:
        eligible = eligible & ~universal.to(scores.device)
    total = total_neurons if total_neurons is not None else scores.numel()
    k = resolve_top_k(top_k, top_frac, total, int(eligible.sum()))
    flat = select_neurons(scores, k, eligible)
    rows, neurons = flat // stats.width, flat % stats.width
    std = stats.std(ddof=1)
    layer_ids = torch.tensor(stats.layers, device=rows.device)[rows]
    info = dict(meta or {})
    info.update(score=score, top_k=k, top_frac=top_frac if top_k is None else None, exclude_layers=sorted(excluded),
                n_positive=int(stats.count[POSITIVE]), n_negative=int(stats.count[NEGATIVE]),
                universal_removed=int(universal.sum()) if universal is not None else 0)
    return Circuit(
        layers=layer_ids, neurons=neurons, scores=scores[rows, neurons],
        deltas=stats.mean[rows, POSITIVE, neurons] - stats.mean[rows, NEGATIVE, neurons],
        mean_positive=stats.mean[rows, POSITIVE, neurons], mean_negative=stats.mean[rows, NEGATIVE, neurons],
        std_positive=std[rows, POSITIVE, neurons], std_negative=std[rows, NEGATIVE, neurons], meta=info,
    )


def bundled_diverse_prompts() -> dict[str, list[str]]:
    """The built-in diverse prompt set for the universal-neuron filter: topic -> prompts."""
    groups: dict[str, list[str]] = {}
    text = resources.files("cna_fast").joinpath("data/diverse.jsonl").read_text(encoding="utf-8")
    for line in text.splitlines():
        record = json.loads(line)
        groups.setdefault(record["topic"], []).append(record["prompt"])
    return groups


@dataclass
class UniversalFilter:
    """Finds neurons that fire for everything, to keep them out of circuits.

    A neuron is universal when, over groups of unrelated diverse prompts (topics), it is either
    (a) in the top `top_frac` by |mean difference| for at least `threshold` of all topic-vs-topic
    contrasts, or (b) in the top `top_frac` by |mean activation| in at least `threshold` of topics.

    prompts: topic -> prompts; None uses the bundled set (8 topics x 12 prompts, works offline).
    """

    prompts: dict[str, Sequence[str]] | None = None
    threshold: float = 0.8
    top_frac: float = DEFAULT_TOP_FRAC

    def find(self, model, tokenizer, *, layers: Sequence[int] | None = None, position: str = "last",
             chat_template: bool | str | None = None, batch_size: int = 32, progress: bool = True) -> torch.Tensor:
        """Bool mask [len(layers), width] of universal neurons."""
        groups = self.prompts if self.prompts is not None else bundled_diverse_prompts()
        if len(groups) < 2:
            raise CNAError("the universal filter needs prompts in at least 2 topics")
        if not 0 < self.threshold <= 1:
            raise CNAError(f"universal filter threshold must be in (0, 1], got {self.threshold}")
        capturer = Capturer(model, tokenizer, layers=layers, position=position, chat_template=chat_template,
                            batch_size=batch_size, progress=progress)
        labeled = [(prompt, group) for group, topic in enumerate(groups) for prompt in groups[topic]]
        stats = capturer.run(labeled, n_groups=len(groups), total=len(labeled))
        k = max(1, round(self.top_frac * stats.mean.shape[0] * stats.width))
        means = stats.mean  # [L, G, width]
        contrast_hits = torch.zeros(means.shape[0] * stats.width, device=means.device)
        pairs = list(itertools.combinations(range(len(groups)), 2))
        for a, b in pairs:
            contrast_hits[select_neurons(means[:, a] - means[:, b], k)] += 1
        magnitude_hits = torch.zeros_like(contrast_hits)
        for group in range(len(groups)):
            magnitude_hits[select_neurons(means[:, group], k)] += 1
        universal = (contrast_hits >= self.threshold * len(pairs)) | (magnitude_hits >= self.threshold * len(groups))
        return universal.view(means.shape[0], stats.width)


def discover(model, tokenizer, positive: Iterable[str], negative: Iterable[str], *, top_k: int | None = None,
             top_frac: float | None = DEFAULT_TOP_FRAC, position: str = "last", score: str = "diff",
             exclude_layers: Iterable[int] = (), chat_template: bool | str | None = None, batch_size: int = 32,
             universal_filter: bool | UniversalFilter | torch.Tensor = False, padding_side: str = "right",
             progress: bool = True, distributed: bool = False, max_length: int | None = None,
             on_long: str = "truncate", checkpoint: str | os.PathLike | None = None, checkpoint_every: int = 10_000,
             resume: bool = False, save_stats: str | os.PathLike | None = None) -> Circuit:
    """Find the circuit: the neurons whose activations best separate `positive` from `negative` prompts.

    top_k / top_frac: circuit size (top_frac of all the model's MLP neurons, 0.1% by default).
    position: "last" (last prompt token, the paper's), "all" (every token) or "mean" (per-prompt mean).
    score: "diff" (mean difference), "t" (Welch t) or "d" (Cohen's d); ranking is by |score| over all layers.
    exclude_layers: layers never selected (and never run past if they are the last ones).
    chat_template: None wraps prompts in the tokenizer's chat template when it has one.
    universal_filter: True (bundled diverse prompts), a UniversalFilter, or a precomputed bool mask
        [num_layers, d_ff] of neurons to exclude.
    distributed: shard the prompts over torch.distributed ranks and merge their statistics; every
        rank returns the same circuit (launch with torchrun; see README "Scaling up").
    max_length / on_long: longer prompts are truncated (default, with a warning) or refused.
    checkpoint / checkpoint_every / resume: save the statistics and stream position to `checkpoint`
        every `checkpoint_every` prompts; with resume=True continue from it. Needs re-readable
        prompt sets (lists or PromptSource files) so the inputs can be fingerprinted.
    save_stats: also write the contrast statistics there (`NeuronStats.save`; rank 0 only), so that
        `cna_fast.tune` can search circuits of every size without capturing again.
    """
    adapter = get_adapter(model)
    validate_position(position)
    validate_score(score)
    excluded = validate_layers(exclude_layers, adapter.num_layers)
    layers = [layer for layer in range(adapter.num_layers) if layer not in excluded]
    if not layers:
        raise CNAError("every layer is excluded: leave at least one layer to search")
    if top_k is not None:
        resolve_top_k(top_k, top_frac, adapter.num_neurons, len(layers) * adapter.d_ff)
    common = dict(layers=layers, position=position, chat_template=chat_template, batch_size=batch_size,
                  progress=progress)
    saver = None
    if checkpoint is not None:
        identity = run_identity(model, tokenizer, positive, negative, layers=layers, position=position,
                                chat_template=chat_template, batch_size=batch_size, padding_side=padding_side,
                                max_length=max_length)
        saver = Checkpoint(checkpoint, checkpoint_every, identity, resume)
    stats = capture_contrast(model, tokenizer, positive, negative, padding_side=padding_side,
                             distributed=distributed, max_length=max_length, on_long=on_long, checkpoint=saver,
                             **common)
    if save_stats is not None and (not distributed or torch.distributed.get_rank() == 0):
        stats.meta = {"model": model_name(model), "fingerprint": adapter.fingerprint(), "position": position,
                      "chat_template": uses_chat_template(tokenizer, chat_template)}
        stats.save(save_stats)
    universal = _universal_mask(universal_filter, model, tokenizer, layers, adapter.num_layers, common)
    meta = {
        "model": model_name(model),
        "fingerprint": adapter.fingerprint(),
        "position": position,
        "chat_template": uses_chat_template(tokenizer, chat_template),
        "universal_filter": universal is not None,
        "cna_fast_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    circuit = attribute(stats, top_k=top_k, top_frac=top_frac, score=score, exclude_layers=excluded,
                        universal=universal, total_neurons=adapter.num_neurons, meta=meta)
    circuit.caa_layers, circuit.caa_directions = mlp_output_directions(model, stats)
    return circuit


def mlp_output_directions(model, stats: NeuronStats) -> tuple[torch.Tensor, torch.Tensor]:
    """Per captured layer, mean(positive) - mean(negative) of the MLP output: the CAA steering vector.

    The down projection is affine, so the difference of output means is the down projection of
    the difference of neuron means (minus its bias): no extra capture is needed, and quantized
    layers are handled by running the layer itself on [delta, 0].
    """
    adapter = get_adapter(model)
    directions = []
    with torch.no_grad():
        for row, layer in enumerate(stats.layers):
            down = adapter.neuron_site(layer)
            weight = next(p for p in down.parameters())
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            delta = (stats.mean[row, POSITIVE] - stats.mean[row, NEGATIVE]).to(weight.device)
            probe = torch.stack([delta, torch.zeros_like(delta)]).to(dtype)
            if hasattr(weight, "quant_state") and weight.quant_state is not None:
                probe = probe.to(weight.quant_state.dtype)
            output = down(probe).float()
            directions.append((output[0] - output[1]).cpu())
    return torch.tensor(stats.layers, dtype=torch.int64), torch.stack(directions)


def run_identity(model, tokenizer, positive, negative, *, layers: list[int], position: str,
                 chat_template: bool | str | None, batch_size: int, padding_side: str,
                 max_length: int | None) -> dict:
    """What a discovery's statistics depend on; a checkpoint only resumes a run with the same identity."""
    return {"model": model_name(model), "fingerprint": get_adapter(model).fingerprint(), "layers": list(layers),
            "position": position, "chat_template": uses_chat_template(tokenizer, chat_template),
            "batch_size": batch_size, "padding_side": padding_side, "max_length": max_length,
            "positive": inputs_fingerprint(positive), "negative": inputs_fingerprint(negative)}


def inputs_fingerprint(prompts) -> str:
    """A hash that identifies a prompt set: the file's bytes for a PromptSource, the texts for a list."""
    from .prompts import PromptSource

    if isinstance(prompts, PromptSource):
        return prompts.fingerprint()
    if isinstance(prompts, (list, tuple)):
        digest = hashlib.sha256()
        for prompt in prompts:
            digest.update(str(prompt).encode("utf-8") + b"\0")
        return digest.hexdigest()
    raise CNAError("checkpointing needs re-readable prompt sets (a list or a PromptSource), not a one-shot iterator")


def _universal_mask(universal_filter, model, tokenizer, layers: list[int], num_layers: int,
                    capture_settings: dict) -> torch.Tensor | None:
    if universal_filter is False or universal_filter is None:
        return None
    if isinstance(universal_filter, torch.Tensor):
        if universal_filter.dtype != torch.bool or universal_filter.shape[0] != num_layers:
            raise CNAError(f"a universal-neuron mask must be a bool tensor [num_layers={num_layers}, d_ff], "
                           f"got {universal_filter.dtype} {list(universal_filter.shape)}")
        return universal_filter[layers]
    finder = UniversalFilter() if universal_filter is True else universal_filter
    return finder.find(model, tokenizer, **capture_settings)


def _version() -> str:
    from . import __version__

    return __version__
