"""Capture settings, declared and validated once, and the one way keyword options fill settings objects.

Every entry point that runs prompts through a model for statistics (`capture_contrast`,
`discover`, the universal filter, the search, the CLI) takes a `CaptureSettings` or builds one from
the same keyword arguments, and a checkpoint's identity is derived from it, so the two cannot drift
apart. Entry points with several settings objects (`discover`, `tune`, `generate_to_file`, ...)
hand their keyword options to `with_options`, which gives each option to the objects that have it.
"""
from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .batching import LONG_PROMPT_POLICIES, PADDING_SIDES
from .errors import CNAError, one_of, positive_int

REDUCTIONS = ("last", "all", "mean")
DEFAULT_BATCH_SIZE = 32
MOE_MODES = ("effective", "conditional")


def validate_reduction(reduction: str) -> str:
    """`reduction` if it names a way to turn a prompt's tokens into samples."""
    return one_of(reduction, REDUCTIONS, "reduction", "last token, all tokens, per-prompt mean")


def validate_moe_mode(mode: str) -> str:
    """`mode` if it names a kind of routed-neuron statistics."""
    return one_of(mode, MOE_MODES, "moe_mode", "router weight x activation, 0 when not routed; or routed samples only")


def validate_layers(layers: Iterable[int], num_layers: int) -> list[int]:
    """Sorted unique layer indices, each checked against the model's layer count."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise CNAError(f"layers must be a list of layer numbers like [0, 1], got {layers!r}")
    checked = set()
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or not 0 <= layer < num_layers:
            raise CNAError(f"layer index {layer!r} is out of range: the model has {num_layers} layers "
                           f"(0..{num_layers - 1})")
        checked.add(int(layer))
    return sorted(checked)


@dataclass(frozen=True)
class CaptureSettings:
    """How prompts become neuron samples; everything a capture's statistics depend on besides model and prompts.

    layers: layers to capture (None: all of them).
    reduction: "last" (the last real token, the paper's), "all" (every token) or "mean" (per-prompt mean).
    chat_template: None wraps prompts in the tokenizer's template when it has one; False feeds raw
        text; a string is a template of its own.
    batch_size: most prompts per forward pass (length buckets may use fewer).
    padding_side: "right" or "left" (results agree; prefixed batches are always right-padded).
    prefix_cache: run the chat template's shared prefix once and reuse its keys and values.
    max_length / on_long: prompts longer than max_length tokens (default: the model's context) are
        truncated, keeping the template prefix and the last tokens, or refused ("error").
    moe_mode: mixture-of-experts models only: routed-neuron statistics of router weight x
        activation, 0 when not routed ("effective"), or over routed samples only ("conditional").
    """

    layers: tuple[int, ...] | None = None
    reduction: str = "last"
    chat_template: bool | str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    padding_side: str = "right"
    prefix_cache: bool = True
    max_length: int | None = None
    on_long: str = "truncate"
    moe_mode: str = "effective"

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise CNAError(f"layers must be a list of layer numbers like [0, 1], got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        validate_reduction(self.reduction)
        if not (self.chat_template is None or isinstance(self.chat_template, (bool, str))):
            raise CNAError(f"chat_template must be None, True, False or a template string, got {self.chat_template!r}")
        positive_int(self.batch_size, "batch_size")
        one_of(self.padding_side, PADDING_SIDES, "padding side")
        if self.max_length is not None:
            positive_int(self.max_length, "max_length")
        one_of(self.on_long, LONG_PROMPT_POLICIES, "on_long")
        validate_moe_mode(self.moe_mode)

    @classmethod
    def build(cls, settings: "CaptureSettings | None" = None, **options: Any) -> "CaptureSettings":
        """`settings` (default: the defaults), with the fields named in `options` replaced."""
        if settings is not None and not isinstance(settings, CaptureSettings):
            raise CNAError(f"settings must be a CaptureSettings, got {type(settings).__name__}")
        return with_options(options, settings if settings is not None else cls())[0]

    def resolved_layers(self, num_layers: int) -> list[int]:
        """The layers to capture on a model with `num_layers` layers, checked."""
        layers = validate_layers(self.layers if self.layers is not None else range(num_layers), num_layers)
        if not layers:
            raise CNAError("no layers left to capture: every layer was excluded")
        return layers

    def identity(self) -> dict[str, Any]:
        """Every field as JSON-ready values (for checkpoint identities and circuit metadata)."""
        values = dataclasses.asdict(self)
        values["layers"] = None if self.layers is None else list(self.layers)
        return values


def with_options(options: Mapping[str, Any], *settings: Any, passthrough: bool = False) -> tuple:
    """The settings objects (frozen dataclasses) with keyword `options` applied, in the order given.

    An option goes to every object that has a field of its name (so `batch_size` reaches both the
    capture and the generation settings of a search). An option that no object has is an error
    naming the known ones; with passthrough=True the unknown ones come back as a last element instead.
    """
    names = [{field.name for field in dataclasses.fields(item)} for item in settings]
    unknown = {key: value for key, value in options.items() if not any(key in fields for fields in names)}
    if unknown and not passthrough:
        known = sorted(set().union(*names))
        raise CNAError(f"unknown option(s) {', '.join(sorted(unknown))}: the options are {', '.join(known)}")
    updated = tuple(dataclasses.replace(item, **{key: value for key, value in options.items() if key in fields})
                    for item, fields in zip(settings, names))
    return (*updated, unknown) if passthrough else updated
