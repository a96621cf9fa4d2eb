"""Residual-stream directions of a contrast: per layer, mean(positive) - mean(negative) of the residual stream at
each prompt's last real token (the refusal direction of Arditi et al., "Refusal in LLMs is mediated by a single
direction", which directional ablation projects out; see `steering.direction`).

Index 0 is the input of the first decoder layer (the embedding output, position embeddings added, as in
transformers' `hidden_states`), index i the output of decoder layer i - 1: num_layers + 1 candidates. The last one
is the last layer's raw output, before the final norm (transformers' last hidden state has that norm applied).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batching import (PADDING_SIDES, Batch, check_prompt, context_length, encode_prompts, pad_batch, pad_token_id,
                        plan_batches, uses_chat_template)
from ..errors import CNAError, one_of, positive_int, text_list
from ..hooks import HookSet
from ..models import get_adapter
from ..stats import NEGATIVE, POSITIVE
from .forward import StopForward, eval_mode, forward_body

MIDDLE_DEPTH = (0.2, 0.8)  # the default layer is chosen among indices within this fraction of the depth
_TINY = 1e-12


@dataclass
class ResidualDirections:
    """Per candidate layer: the difference of the means, and how well its direction separates the two prompt sets.

    differences: [num_layers + 1, hidden] float64, mean(positive) - mean(negative) at the last real token.
    cohens_d: [num_layers + 1] float64, Cohen's d of the per-prompt projections onto each unit direction
        (pooled standard deviation); large where the two sets fall apart along that layer's direction.
    meta: model type, layer count, chat template used, prompt counts.
    """

    differences: torch.Tensor
    cohens_d: torch.Tensor
    meta: dict = field(default_factory=dict)

    @property
    def num_layers(self) -> int:
        """Decoder layers of the model (the candidates are one more)."""
        return len(self.differences) - 1

    def middle_layers(self, depth: tuple[float, float] = MIDDLE_DEPTH) -> list[int]:
        """Candidate indices within `depth` (fractions of the number of decoder layers), ends included."""
        low, high = depth
        chosen = [index for index in range(self.num_layers + 1)
                  if low * self.num_layers <= index <= high * self.num_layers]
        return chosen or list(range(1, self.num_layers + 1))

    def best_layer(self, depth: tuple[float, float] = MIDDLE_DEPTH) -> int:
        """The middle layer whose direction separates the prompt sets best (largest Cohen's d): the default layer.

        The first and last layers are left out by default: early directions are mostly token identity, late ones
        mostly the next token, and neither is the behavior.
        """
        candidates = self.middle_layers(depth)
        return max(candidates, key=lambda index: float(self.cohens_d[index]))

    def direction(self, layer: int | None = None) -> torch.Tensor:
        """The unit direction [hidden] (float32) of `layer` (default: `best_layer()`)."""
        if layer is None:
            layer = self.best_layer()
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer <= self.num_layers:
            raise CNAError(f"direction layer {layer!r} is out of range: choose 0 (the embedding output) to "
                           f"{self.num_layers} (the last decoder layer's output)")
        difference = self.differences[layer]
        norm = difference.norm()
        if not torch.isfinite(norm) or norm == 0:
            raise CNAError(f"the layer-{layer} direction is zero or not finite: the two prompt sets give the same "
                           "mean there; choose another layer or other prompts")
        return (difference / norm).float()


def _last_real_positions(batch: Batch) -> torch.Tensor:
    """Each row's position of its last real (non-pad) token; checked against the attention mask."""
    width = batch.attention_mask.shape[1]
    positions = (torch.full_like(batch.lengths, width - 1) if batch.padding_side == "left"
                 else batch.lengths - 1)
    if not batch.attention_mask.gather(1, positions[:, None]).bool().all():
        raise RuntimeError("the last-token position of a row points at a pad")
    return positions


def _states_at_last_token(model: nn.Module, batch: Batch) -> torch.Tensor:
    """[rows, num_layers + 1, hidden] float32: the input of decoder layer 0 and every layer's output, at each row's
    last real token. The forward stops after the last decoder layer (no final norm, no LM head)."""
    adapter = get_adapter(model)
    positions = _last_real_positions(batch)
    rows = torch.arange(len(positions))
    states: list[torch.Tensor | None] = [None] * (adapter.num_layers + 1)

    def keep(index: int, hidden: torch.Tensor) -> None:
        states[index] = hidden[rows.to(hidden.device), positions.to(hidden.device)].float().cpu()

    def first_input(module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    def make_output_hook(index: int):
        def hook(module, args, output):
            keep(index, output[0] if isinstance(output, tuple) else output)
            if index == adapter.num_layers:
                raise StopForward

        return hook

    with HookSet() as hooks:
        hooks.pre_hook(adapter.blocks[0], first_input, with_kwargs=True)
        for layer, block in enumerate(adapter.blocks):
            hooks.post_hook(block, make_output_hook(layer + 1))
        forward_body(model, batch)
    return torch.stack(states, dim=1)


def _cohens_d(positive: torch.Tensor, negative: torch.Tensor, differences: torch.Tensor) -> torch.Tensor:
    """Per layer, Cohen's d of the projections of the rows [n, layers, hidden] onto each layer's unit direction."""
    units = differences / differences.norm(dim=-1, keepdim=True).clamp_min(_TINY)
    projected_positive = torch.einsum("nlh,lh->nl", positive.double(), units)
    projected_negative = torch.einsum("nlh,lh->nl", negative.double(), units)
    count_positive, count_negative = len(positive), len(negative)
    pooled = ((count_positive - 1) * projected_positive.var(0) + (count_negative - 1) * projected_negative.var(0)) \
        / (count_positive + count_negative - 2)
    gap = projected_positive.mean(0) - projected_negative.mean(0)
    return gap / pooled.sqrt().clamp_min(_TINY)


def _encoded_sides(model: nn.Module, tokenizer, positive: list[str], negative: list[str],
                   chat_template: bool | str | None) -> tuple[list[list[int]], list[int]]:
    """Token ids of every prompt as generation encodes it, and its side (POSITIVE or NEGATIVE)."""
    for name, prompts in (("positive", positive), ("negative", negative)):
        if len(prompts) < 2:
            raise CNAError(f"the {name} prompt set has {len(prompts)} prompt(s); the direction's Cohen's d needs at "
                           f"least 2 per side: give more {name} prompts")
        for number, prompt in enumerate(prompts, 1):
            check_prompt(prompt, number, f"{name} ")
    encoded = encode_prompts(tokenizer, positive + negative, chat_template)
    limit = context_length(model)
    for number, ids in enumerate(encoded, 1):
        if limit is not None and len(ids) > limit:
            raise CNAError(f"prompt {number} of the direction's prompts has {len(ids)} tokens, more than the model's "
                           f"context of {limit}: shorten it")
    return encoded, [POSITIVE] * len(positive) + [NEGATIVE] * len(negative)


def residual_directions(model: nn.Module, tokenizer, positive: Iterable[str], negative: Iterable[str], *,
                        chat_template: bool | str | None = None, batch_size: int = 16, padding_side: str = "right",
                        progress: bool = True) -> ResidualDirections:
    """Mean(positive) - mean(negative) of the residual stream at the last real prompt token, per candidate layer.

    Prompts are encoded as generation encodes them (the chat template with the generation prompt unless
    chat_template is False), run in length-sorted batches of at most `batch_size`, padded on `padding_side`, in
    eval mode under inference_mode. Each prompt's last-token states are kept ((num_layers + 1) x hidden float32
    per prompt) for Cohen's d; the means are taken in float64.
    """
    positive, negative = text_list(positive, "positive prompts"), text_list(negative, "negative prompts")
    positive_int(batch_size, "batch_size")
    one_of(padding_side, PADDING_SIDES, "padding side")
    encoded, sides = _encoded_sides(model, tokenizer, positive, negative, chat_template)
    pad_id = pad_token_id(tokenizer)
    collected: dict[int, list[torch.Tensor]] = {POSITIVE: [], NEGATIVE: []}
    with eval_mode(model), torch.inference_mode(), tqdm(total=len(encoded), desc="residual directions",
                                                        unit="prompt", disable=not progress) as bar:
        for planned in plan_batches(encoded, sides, batch_size):
            batch = pad_batch(planned.sequences, planned.labels, pad_id, padding_side)
            states = _states_at_last_token(model, batch)
            for side in (POSITIVE, NEGATIVE):
                collected[side].append(states[batch.labels == side])
            bar.update(len(planned.sequences))
    states_positive, states_negative = torch.cat(collected[POSITIVE]), torch.cat(collected[NEGATIVE])
    differences = states_positive.double().mean(0) - states_negative.double().mean(0)
    if not torch.isfinite(differences).all():
        raise CNAError("the residual stream holds inf or nan for these prompts: check the model and its dtype")
    adapter = get_adapter(model)
    meta = {"model_type": adapter.model_type, "num_layers": adapter.num_layers, "n_positive": len(positive),
            "n_negative": len(negative), "chat_template": uses_chat_template(tokenizer, chat_template),
            "reduction": "last"}
    return ResidualDirections(differences, _cohens_d(states_positive, states_negative, differences), meta)
