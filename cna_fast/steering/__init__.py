"""Steering: apply circuits at inference (scale their neurons), the CAA and directional-ablation baselines, and
batched generation.

`steering_class` makes the dense / mixture-of-experts choice once: `steer` and `generate` (and
through them every later stage) build a `Steering`, or an `MoESteering` that also scales routed
neurons inside the experts' forward.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, ContextManager

import torch
from torch import nn

from ..batching import encode_prompts, generation_overflow
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError
from ..models import is_moe
from ..settings import with_options
from .direction import AblateDirection, ablation_changed_parameters, circuit_changed_parameters, residual_width
from .residual import AddDirections, caa
from .generation import GenerationSettings, checked_prompts, generate_batch, multiplier_table
from .moe import MoESteering
from .scale import (POSITION_MODES, Steering, as_circuits, check_multiplier_fits, check_multipliers, circuit_key,
                    validate_positions)

__all__ = ["POSITION_MODES", "AblateDirection", "AddDirections", "GenerationSettings", "MoESteering", "Steering",
           "ablation_changed_parameters", "caa", "check_multiplier_fits", "check_multipliers",
           "circuit_changed_parameters", "circuit_key", "generate", "generate_with_baseline", "residual_width", "steer",
           "steering_class", "validate_positions"]


def steering_class(model: nn.Module) -> type[Steering]:
    """MoESteering for mixture-of-experts models, Steering otherwise."""
    return MoESteering if is_moe(model) else Steering


def steer(model: nn.Module, circuits: Circuit | Sequence[Circuit], multiplier: float = 0.0, *,
          multipliers: Sequence[float] | torch.Tensor | None = None, positions: str = "all",
          allow_stacking: bool = False) -> Steering:
    """Scale the circuit neurons' activations in every forward pass until removed.

    multiplier: one factor for every circuit (0 ablates, 1 is the identity, > 1 amplifies).
    multipliers: instead, [n_circuits] factors, or [batch, n_circuits] for a different factor per row.
    positions: "all" tokens, "prompt" tokens only, or "generated" tokens only (decode steps of generate).
    allow_stacking: permit applying a circuit that is already applied (the factors then multiply).

    Use as `with steer(model, circuit, 0.0): ...`, or keep the handle and call `remove()`.
    """
    chosen = as_multiplier(multiplier) if multipliers is None else multipliers
    return steering_class(model)(model, circuits, chosen, positions=positions, allow_stacking=allow_stacking)


def generate(model: nn.Module, tokenizer, prompts: Sequence[str], *,
             circuits: Circuit | Sequence[Circuit] | None = None, multiplier: float = 0.0,
             multipliers: Sequence[float] | torch.Tensor | None = None, generation: GenerationSettings | None = None,
             batch_context: Callable[[list[int]], ContextManager] | None = None, progress: bool = True,
             **options: Any) -> list[str]:
    """Generate a completion per prompt, optionally steered; returns the new text in input order.

    generation / options: a GenerationSettings, or its fields as keywords (max_new_tokens,
        batch_size, positions, chat_template, do_sample, temperature, top_p, seed); other keywords
        go to `model.generate` (repetition_penalty, ...). With a seed, sampling starts from torch.manual_seed(seed).
    circuits: a Circuit or a list of them. multipliers: [n_circuits], or [len(prompts), n_circuits]
        for a different steering per prompt (one batched run of a whole sweep).
    batch_context: called with each batch's prompt indices; the context it returns wraps that
        batch's generation (e.g. a per-row CAA baseline).
    Prompts go through the chat template (when the tokenizer has one and chat_template is not
    False), are sorted by length and left-padded in batches of `batch_size`.
    """
    from tqdm.auto import tqdm

    settings, extra = with_options(options, generation or GenerationSettings(), passthrough=True)
    prompts = checked_prompts(prompts)
    circuits = None if circuits is None else as_circuits(circuits)
    table = multiplier_table(circuits, multiplier, multipliers, len(prompts))
    encoded = encode_prompts(tokenizer, prompts, settings.chat_template)
    for number, ids in enumerate(encoded, start=1):
        overflow = generation_overflow(model, len(ids), settings.max_new_tokens)
        if overflow:
            raise CNAError(f"prompt {number}: {overflow}")
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    outputs: list[str] = [""] * len(prompts)
    if settings.do_sample and settings.seed is not None:
        torch.manual_seed(settings.seed)
    with contextlib.ExitStack() as stack, tqdm(total=len(prompts), desc="generate", unit="prompt",
                                               disable=not progress) as bar:
        if table is not None and table.dim() == 1:
            stack.enter_context(steer(model, circuits, multipliers=table, positions=settings.positions))
        for start in range(0, len(order), settings.batch_size):
            rows = order[start:start + settings.batch_size]
            with contextlib.ExitStack() as batch_stack:
                if table is not None and table.dim() == 2:
                    batch_stack.enter_context(steer(model, circuits, multipliers=table[rows],
                                                    positions=settings.positions))
                if batch_context is not None:
                    batch_stack.enter_context(batch_context(rows))
                texts = generate_batch(model, tokenizer, [encoded[i] for i in rows],
                                       {**settings.generate_kwargs(), **extra})
            for row, text in zip(rows, texts):
                outputs[row] = text
            bar.update(len(rows))
    return outputs


def generate_with_baseline(model: nn.Module, tokenizer, circuit: Circuit, prompts: Sequence[str], multiplier: float,
                           generation: GenerationSettings | None = None, **options: Any) -> tuple[list[str], list[str]]:
    """Unsteered and steered completions of `prompts` in one batched run (per-row multipliers): (baseline, steered)."""
    prompts = checked_prompts(prompts)
    multipliers = torch.tensor([[1.0]] * len(prompts) + [[multiplier]] * len(prompts), dtype=torch.float64)
    texts = generate(model, tokenizer, prompts + prompts, circuits=circuit, multipliers=multipliers,
                     generation=generation, **options)
    return texts[:len(prompts)], texts[len(prompts):]
