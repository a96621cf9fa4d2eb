"""The whole discovery: prompts -> capture -> statistics -> attribution -> circuit, in one call.

`discover` runs the stages in order and adds what needs the model: the universal-neuron filter's
own capture, the CAA directions computed through the down projections, and the checkpoint
identity. Each stage is also usable alone (`capture.capture_contrast`, `attribution.attribute`).
"""
from __future__ import annotations

import datetime
import hashlib
import itertools
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import Iterable, Sequence

import torch
from torch import nn

from .attribution import DEFAULT_TOP_FRAC, attribute, resolve_top_k, select_neurons, validate_score
from .batching import uses_chat_template
from .capture import Capturer, capture_contrast
from .checkpoint import Checkpoint
from .circuit import Circuit
from .errors import CNAError
from .models import get_adapter, model_name
from .models.moe import MoEAdapter
from .moe_attribution import attribute_moe
from .settings import CaptureSettings, validate_layers
from .stats import NEGATIVE, POSITIVE, NeuronStats

DEFAULT_CHECKPOINT_EVERY = 10_000


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

    def find(self, model: nn.Module, tokenizer, settings: CaptureSettings | None = None, *, progress: bool = True,
             **options) -> torch.Tensor:
        """Bool mask [len(layers), width] of universal neurons, captured with `settings` (or its fields)."""
        groups = self.prompts if self.prompts is not None else bundled_diverse_prompts()
        if len(groups) < 2:
            raise CNAError("the universal filter needs prompts in at least 2 topics")
        if not 0 < self.threshold <= 1:
            raise CNAError(f"universal filter threshold must be in (0, 1], got {self.threshold}")
        capturer = Capturer(model, tokenizer, settings, progress=progress, **options)
        labeled = [(prompt, group) for group, topic in enumerate(groups) for prompt in groups[topic]]
        stats = capturer.run(labeled, n_groups=len(groups), total=len(labeled))
        return self.mask(stats)

    def mask(self, stats: NeuronStats) -> torch.Tensor:
        """Universal neurons from statistics with one group per topic: bool [len(layers), width]."""
        k = max(1, round(self.top_frac * stats.mean.shape[0] * stats.width))
        means = stats.mean  # [L, G, width]
        contrast_hits = torch.zeros(means.shape[0] * stats.width, device=means.device)
        pairs = list(itertools.combinations(range(stats.n_groups), 2))
        for a, b in pairs:
            contrast_hits[select_neurons(means[:, a] - means[:, b], k)] += 1
        magnitude_hits = torch.zeros_like(contrast_hits)
        for group in range(stats.n_groups):
            magnitude_hits[select_neurons(means[:, group], k)] += 1
        universal = ((contrast_hits >= self.threshold * len(pairs))
                     | (magnitude_hits >= self.threshold * stats.n_groups))
        return universal.view(means.shape[0], stats.width)


def discover(model: nn.Module, tokenizer, positive: Iterable[str], negative: Iterable[str],
             settings: CaptureSettings | None = None, *, top_k: int | None = None,
             top_frac: float | None = DEFAULT_TOP_FRAC, score: str = "diff", exclude_layers: Iterable[int] = (),
             universal_filter: bool | UniversalFilter | torch.Tensor = False, progress: bool = True,
             distributed: bool = False, checkpoint: str | os.PathLike | None = None,
             checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, resume: bool = False,
             save_stats: str | os.PathLike | None = None, **options) -> Circuit:
    """Find the circuit: the neurons whose activations best separate `positive` from `negative` prompts.

    settings / options: how prompts are captured, a CaptureSettings or its fields as keywords
        (reduction "last" | "all" | "mean", chat_template, batch_size, padding_side, max_length, ...).
    top_k / top_frac: circuit size (top_frac of all the model's MLP neurons, 0.1% by default).
    score: "diff" (mean difference), "t" (Welch t) or "d" (Cohen's d); ranking is by |score| over all layers.
    exclude_layers: layers never selected (and never run past if they are the last ones).
    universal_filter: True (bundled diverse prompts), a UniversalFilter, or a precomputed bool mask
        [num_layers, d_ff] of neurons to exclude.
    distributed: shard the prompts over torch.distributed ranks and merge their statistics; every
        rank returns the same circuit (launch with torchrun; see README "Scaling up").
    checkpoint / checkpoint_every / resume: save the statistics and stream position to `checkpoint`
        at the end of every tokenization window once `checkpoint_every` prompts have passed; with
        resume=True continue from it. Needs re-readable prompt sets (lists or PromptSource files).
    save_stats: also write the contrast statistics there (rank 0 only), so that `cna_fast.tune` can
        search circuits of every size without capturing again.
    """
    adapter = get_adapter(model)
    validate_score(score)
    settings, excluded = _search_settings(adapter, CaptureSettings.build(settings, **options), exclude_layers)
    if top_k is not None:
        resolve_top_k(top_k, top_frac, adapter.num_neurons, adapter.neurons_in(settings.layers))
    moe = _is_moe(adapter, universal_filter)
    saver = None
    if checkpoint is not None:
        saver = Checkpoint(checkpoint, checkpoint_every, run_identity(model, tokenizer, positive, negative, settings),
                           resume)
    stats = capture_contrast(model, tokenizer, positive, negative, settings, progress=progress,
                             distributed=distributed, checkpoint=saver)
    if save_stats is not None:
        _save_stats(stats, save_stats, model, tokenizer, settings, distributed)
    universal = _universal_mask(universal_filter, model, tokenizer, settings, progress)
    meta = _provenance(model, tokenizer, settings, universal is not None)
    return _circuit(model, stats, universal, moe, top_k=top_k, top_frac=top_frac, score=score,
                    exclude_layers=excluded, total_neurons=adapter.num_neurons, meta=meta)


def _is_moe(adapter, universal_filter) -> bool:
    """Whether the model is mixture-of-experts (where the universal-neuron filter is refused, for now)."""
    moe = isinstance(adapter, MoEAdapter)
    if moe and universal_filter is not False and universal_filter is not None:
        raise CNAError("the universal-neuron filter does not cover mixture-of-experts models yet: run without it")
    return moe


def _circuit(model: nn.Module, stats, universal: torch.Tensor | None, moe: bool, **settings) -> Circuit:
    """Attribution of dense or MoE statistics; dense circuits also get their CAA directions."""
    if moe:  # no CAA directions yet: the MoE output also depends on the routing
        return attribute_moe(stats, **settings)
    circuit = attribute(stats, universal=universal, **settings)
    circuit.caa_layers, circuit.caa_directions = mlp_output_directions(model, stats)
    return circuit


def _search_settings(adapter, settings: CaptureSettings, exclude_layers) -> tuple[CaptureSettings, list[int]]:
    """The settings with the excluded layers left out of the captured ones, and the excluded layers."""
    if isinstance(exclude_layers, (int, str, bytes)):
        raise CNAError(f"exclude_layers must be a list of layer numbers like [0, 1], got {exclude_layers!r}")
    excluded = validate_layers(exclude_layers, adapter.num_layers)
    kept = tuple(layer for layer in settings.resolved_layers(adapter.num_layers) if layer not in excluded)
    if not kept:
        raise CNAError("every layer is excluded: leave at least one layer to search")
    return CaptureSettings.build(settings, layers=kept), excluded


def _provenance(model: nn.Module, tokenizer, settings: CaptureSettings, universal_filter: bool) -> dict:
    """What a circuit records about where it came from."""
    return {
        "model": model_name(model),
        "fingerprint": get_adapter(model).architecture(),
        "position": settings.reduction,
        "chat_template": uses_chat_template(tokenizer, settings.chat_template),
        "universal_filter": universal_filter,
        "cna_fast_version": _version(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _save_stats(stats: NeuronStats, path: str | os.PathLike, model: nn.Module, tokenizer,
                settings: CaptureSettings, distributed: bool) -> None:
    """Write the statistics with what they were captured from (on rank 0 of a distributed run)."""
    if distributed and torch.distributed.get_rank() != 0:
        return
    stats.meta = {"model": model_name(model), "fingerprint": get_adapter(model).architecture(),
                  "position": settings.reduction, "capture": settings.identity(),
                  "chat_template": uses_chat_template(tokenizer, settings.chat_template)}
    stats.save(path)


def mlp_output_directions(model: nn.Module, stats: NeuronStats) -> tuple[torch.Tensor, torch.Tensor]:
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


def run_identity(model: nn.Module, tokenizer, positive, negative, settings: CaptureSettings) -> dict:
    """What a discovery's statistics depend on; a checkpoint only resumes a run with the same identity.

    Built from the model, every capture setting and the inputs' hashes, so a changed setting of
    any kind changes the identity.
    """
    adapter = get_adapter(model)
    return {"model": model_name(model), "fingerprint": adapter.architecture(),
            **settings.identity(), "layers": settings.resolved_layers(adapter.num_layers),
            "chat_template": uses_chat_template(tokenizer, settings.chat_template),
            "chat_template_text": settings.chat_template if isinstance(settings.chat_template, str) else None,
            "positive": prompts_hash(positive), "negative": prompts_hash(negative)}


def prompts_hash(prompts) -> str:
    """A hash that identifies a prompt set: the file's bytes for a PromptSource, the texts for a list."""
    from .prompts import PromptSource

    if isinstance(prompts, PromptSource):
        return prompts.content_hash()
    if isinstance(prompts, (list, tuple)):
        digest = hashlib.sha256()
        for prompt in prompts:
            digest.update(str(prompt).encode("utf-8") + b"\0")
        return digest.hexdigest()
    raise CNAError("checkpointing needs re-readable prompt sets (a list or a PromptSource), not a one-shot iterator")


def _universal_mask(universal_filter, model: nn.Module, tokenizer, settings: CaptureSettings,
                    progress: bool) -> torch.Tensor | None:
    if universal_filter is False or universal_filter is None:
        return None
    num_layers = get_adapter(model).num_layers
    if isinstance(universal_filter, torch.Tensor):
        if universal_filter.dtype != torch.bool or universal_filter.shape[0] != num_layers:
            raise CNAError(f"a universal-neuron mask must be a bool tensor [num_layers={num_layers}, d_ff], "
                           f"got {universal_filter.dtype} {list(universal_filter.shape)}")
        return universal_filter[list(settings.layers)]
    if not isinstance(universal_filter, (bool, UniversalFilter)):
        raise CNAError(f"universal_filter must be True, False, a UniversalFilter or a bool mask, got "
                       f"{type(universal_filter).__name__}")
    finder = UniversalFilter() if universal_filter is True else universal_filter
    return finder.find(model, tokenizer, settings, progress=progress)


def _version() -> str:
    from . import __version__

    return __version__
