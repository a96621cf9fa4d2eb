"""Capture: prompts through the model in batched forward passes, activations folded into statistics.

`capturer_for` makes the dense / mixture-of-experts choice once: a `Capturer` returns
`NeuronStats`, an `MoECapturer` returns `MoEStats`. `capture_contrast` runs the positive and
negative prompts of a contrast through it (sharded over ranks when distributed, checkpointed).
`residual_directions` takes the residual stream's per-layer mean difference instead (the direction
that directional ablation projects out).
"""
from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from ..errors import CNAError
from ..models import is_moe
from ..settings import CaptureSettings
from ..stats import NEGATIVE, POSITIVE, Stats
from .accumulators import Accumulator, DeviceStats, FusedMoments
from .capturer import Capturer, check_prompt_set, labeled_prompts
from .checkpoint import DEFAULT_EVERY, Checkpoint
from .distributed import init_distributed, rank_and_world, shard
from .forward import Recorder, SharedPrefix, StopForward, eval_mode
from .moe import MoECapturer
from .residual import MIDDLE_DEPTH, ResidualDirections, residual_directions

__all__ = ["DEFAULT_EVERY", "MIDDLE_DEPTH", "Accumulator", "Capturer", "Checkpoint", "DeviceStats", "FusedMoments",
           "MoECapturer", "Recorder", "ResidualDirections", "SharedPrefix", "StopForward", "capture_contrast",
           "capturer_for", "eval_mode", "init_distributed", "residual_directions"]


def capturer_for(model: nn.Module, tokenizer, settings: CaptureSettings | None = None, *, progress: bool = True,
                 **options) -> Capturer:
    """A capturer for `model`: MoECapturer on mixture-of-experts models, Capturer otherwise."""
    settings = CaptureSettings.build(settings, **options)
    if is_moe(model):
        return MoECapturer(model, tokenizer, settings, progress=progress)
    if settings.moe_mode != "effective":
        raise CNAError(f"moe_mode={settings.moe_mode!r} applies to mixture-of-experts models only; this model is "
                       "dense")
    return Capturer(model, tokenizer, settings, progress=progress)


def capture_contrast(model: nn.Module, tokenizer, positive: Iterable[str], negative: Iterable[str],
                     settings: CaptureSettings | None = None, *, progress: bool = True, distributed: bool = False,
                     checkpoint: Checkpoint | None = None, **options) -> Stats:
    """Statistics of positive (group 1) and negative (group 0) prompts in one stream of mixed batches.

    settings / options: a CaptureSettings, or its fields as keywords (layers, reduction, batch_size, ...).
    distributed: under torch.distributed (torchrun), each rank streams every world_size-th prompt of
    each set and the ranks' moments are merged exactly; every rank returns the merged statistics.
    checkpoint: save progress periodically and resume (per rank when distributed).
    """
    check_prompt_set(positive, "positive")
    check_prompt_set(negative, "negative")
    capturer = capturer_for(model, tokenizer, settings, progress=progress, **options)
    total = None
    if hasattr(positive, "__len__") and hasattr(negative, "__len__"):
        total = len(positive) + len(negative)
    if distributed:
        rank, world = rank_and_world()
        positive, negative = shard(positive, rank, world), shard(negative, rank, world)
        total = None if total is None else len(range(rank, total, world))
        if checkpoint is not None:
            checkpoint = checkpoint.for_rank(rank, world)
    stats = capturer.run(labeled_prompts(positive, negative), n_groups=2, total=total, allow_empty=distributed,
                         checkpoint=checkpoint)
    if distributed:
        stats.all_reduce()
    for side, name in ((POSITIVE, "positive"), (NEGATIVE, "negative")):
        if stats.count[side] == 0:
            raise CNAError(f"the {name} prompt set is empty: give at least one {name} prompt")
    return stats
