"""The whole discovery: prompts -> capture -> statistics -> attribution -> circuit, in one call.

`discover` runs the stages in order and adds what needs the model: the universal-neuron filter's
own capture, the CAA directions computed through the down projections, the checkpoint identity and
the circuit's provenance. Each stage is also usable alone (`capture.capture_contrast`,
`attribution.attribute`).
"""
from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from ._version import __version__
from .attribution import DEFAULT_TOP_FRAC, Selection, attribute, select_neurons
from .batching import uses_chat_template
from .capture import Checkpoint, capture_contrast, capturer_for
from .circuit import Circuit
from .errors import CNAError
from .models import get_adapter, is_moe, model_name
from .prompts import bundled_diverse_prompts, prompts_hash
from .settings import CaptureSettings, validate_layers, with_options
from .stats import NEGATIVE, POSITIVE, NeuronStats, Stats


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
        if is_moe(model):
            raise CNAError("the universal-neuron filter does not cover mixture-of-experts models yet: run without it")
        capturer = capturer_for(model, tokenizer, settings, progress=progress, **options)
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
             settings: CaptureSettings | None = None, *, selection: Selection | None = None,
             universal_filter: bool | UniversalFilter | torch.Tensor = False,
             checkpoint: str | os.PathLike | Checkpoint | None = None, distributed: bool = False,
             save_stats: str | os.PathLike | None = None, progress: bool = True, **options: Any) -> Circuit:
    """Find the circuit: the neurons whose activations best separate `positive` from `negative` prompts.

    settings / selection / options: how prompts are captured (a CaptureSettings: reduction "last" |
        "all" | "mean", chat_template, batch_size, max_length, moe_mode, ...) and which neurons are
        selected (a Selection: top_k or top_frac of all the model's MLP neurons, 0.1% by default;
        score "diff" | "t" | "d"; exclude_layers, never selected nor run past when they are the last),
        or any of their fields as keywords.
    universal_filter: True (bundled diverse prompts), a UniversalFilter, or a precomputed bool mask
        [num_layers, d_ff] of neurons to exclude.
    checkpoint: a file (or a Checkpoint with how often to save and whether to resume) where the
        statistics and stream position are saved at the end of tokenization windows. Resuming needs
        re-readable prompt sets (lists or PromptSource files).
    distributed: shard the prompts over torch.distributed ranks and merge their statistics; every
        rank returns the same circuit (launch with torchrun; see README "Scaling up").
    save_stats: also write the contrast statistics there (rank 0 only), so that `cna_fast.tune` can
        search circuits of every size without capturing again.
    """
    adapter = get_adapter(model)
    settings, selection = with_options(options, CaptureSettings.build(settings), selection or Selection())
    settings = capture_layers(adapter, settings, selection.exclude_layers)
    if selection.top_k is not None:
        selection.size(adapter.num_neurons, adapter.neurons_in(settings.layers))
    if is_moe(adapter) and universal_filter is not False and universal_filter is not None:
        raise CNAError("the universal-neuron filter does not cover mixture-of-experts models yet: run without it")
    if checkpoint is not None:
        checkpoint = dataclasses.replace(checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint),
                                         identity=run_identity(model, tokenizer, positive, negative, settings))
    stats = capture_contrast(model, tokenizer, positive, negative, settings, progress=progress,
                             distributed=distributed, checkpoint=checkpoint)
    if save_stats is not None and not (distributed and torch.distributed.get_rank() != 0):
        stats.meta = provenance(model, tokenizer, settings)
        stats.save(save_stats)
    universal = _universal_mask(universal_filter, model, tokenizer, settings, progress)
    circuit = attribute(stats, selection, universal=universal, total_neurons=adapter.num_neurons,
                        meta=provenance(model, tokenizer, settings, universal_filter=universal is not None))
    circuit.caa_layers, circuit.caa_directions = mlp_output_directions(model, stats)
    return circuit


def capture_layers(adapter, settings: CaptureSettings, exclude_layers: Sequence[int]) -> CaptureSettings:
    """The settings with the excluded layers left out of the captured ones (they are never selected)."""
    excluded = validate_layers(exclude_layers, adapter.num_layers)
    kept = tuple(layer for layer in settings.resolved_layers(adapter.num_layers) if layer not in excluded)
    if not kept:
        raise CNAError("every layer is excluded: leave at least one layer to search")
    return CaptureSettings.build(settings, layers=kept)


def provenance(model: nn.Module, tokenizer, settings: CaptureSettings, *, universal_filter: bool = False) -> dict:
    """What a circuit (or a statistics file) records about where it came from."""
    return {
        "model": model_name(model),
        "architecture": get_adapter(model).architecture(),
        "reduction": settings.reduction,
        "capture": settings.identity(),
        "chat_template": uses_chat_template(tokenizer, settings.chat_template),
        "universal_filter": universal_filter,
        "cna_fast_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def mlp_output_directions(model: nn.Module, stats: Stats) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per captured layer, mean(positive) - mean(negative) of the MLP output: the CAA steering vector.

    The down projection is affine, so the difference of output means is the down projection of
    the difference of neuron means (minus its bias): no extra capture is needed, and quantized
    layers are handled by running the layer itself on [delta, 0]. (None, None) for MoE statistics:
    an MoE layer's output also depends on the routing.
    """
    if not isinstance(stats, NeuronStats):
        return None, None
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
    return {"model": model_name(model), "architecture": adapter.architecture(),
            **settings.identity(), "layers": settings.resolved_layers(adapter.num_layers),
            "chat_template": uses_chat_template(tokenizer, settings.chat_template),
            "chat_template_text": settings.chat_template if isinstance(settings.chat_template, str) else None,
            "positive": prompts_hash(positive), "negative": prompts_hash(negative)}


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
