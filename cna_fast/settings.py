"""Capture settings, declared and validated once.

Every entry point that runs prompts through a model for statistics (`capture_contrast`,
`discover`, the universal filter, the CLI) takes a `CaptureSettings` or builds one from the same
keyword arguments, and a checkpoint's identity is derived from it, so the two cannot drift apart.
"""
from __future__ import annotations

import dataclasses
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

from .batching import LONG_PROMPT_POLICIES, PADDING_SIDES
from .errors import CNAError

REDUCTIONS = ("last", "all", "mean")
DEFAULT_BATCH_SIZE = 32


def validate_reduction(reduction: str) -> str:
    """`reduction` if it names a way to turn a prompt's tokens into samples."""
    if reduction not in REDUCTIONS:
        raise CNAError(f"unknown reduction {reduction!r}: choose one of {', '.join(REDUCTIONS)} (last token, "
                       "all tokens, per-prompt mean)")
    return reduction


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
    """

    layers: tuple[int, ...] | None = None
    reduction: str = "last"
    chat_template: bool | str | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    padding_side: str = "right"
    prefix_cache: bool = True
    max_length: int | None = None
    on_long: str = "truncate"

    def __post_init__(self) -> None:
        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Iterable):
                raise CNAError(f"layers must be a list of layer numbers like [0, 1], got {self.layers!r}")
            object.__setattr__(self, "layers", tuple(self.layers))
        validate_reduction(self.reduction)
        if not (self.chat_template is None or isinstance(self.chat_template, (bool, str))):
            raise CNAError(f"chat_template must be None, True, False or a template string, got {self.chat_template!r}")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise CNAError(f"batch_size must be a positive integer, got {self.batch_size!r}")
        if self.padding_side not in PADDING_SIDES:
            raise CNAError(f"unknown padding side {self.padding_side!r}: choose left or right")
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)
                                            or self.max_length < 1):
            raise CNAError(f"max_length must be a positive integer, got {self.max_length!r}")
        if self.on_long not in LONG_PROMPT_POLICIES:
            raise CNAError(f"unknown on_long {self.on_long!r}: choose truncate or error")

    @classmethod
    def build(cls, settings: "CaptureSettings | None" = None, **options: Any) -> "CaptureSettings":
        """`settings`, or settings made from keyword options (`position` is a deprecated name of `reduction`).

        Options given beside `settings` replace its fields.
        """
        if "position" in options:
            warnings.warn("position= is deprecated: use reduction= (same values: last, all, mean)",
                          DeprecationWarning, stacklevel=3)
            options["reduction"] = options.pop("position")
        unknown = sorted(set(options) - {field.name for field in dataclasses.fields(cls)})
        if unknown:
            raise CNAError(f"unknown capture setting(s) {', '.join(unknown)}: the settings are "
                           f"{', '.join(field.name for field in dataclasses.fields(cls))}")
        base = settings if settings is not None else cls()
        if not isinstance(base, CaptureSettings):
            raise CNAError(f"settings must be a CaptureSettings, got {type(base).__name__}")
        return dataclasses.replace(base, **options) if options else base

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
