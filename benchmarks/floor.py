"""The floor of a capture benchmark: the batches cna_fast builds, as bare model-body inputs."""
from __future__ import annotations

import torch

from cna_fast.batching import Batch, encode_prompts, pad_after_prefix, pad_token_id, plan_batches, shared_prefix


def floor_batches(tokenizer, prompts: list[str], batch_size: int,
                  use_prefix: bool) -> tuple[list[int], list[tuple[Batch, torch.Tensor, bool]]]:
    """The shared prefix's tokens (empty without it) and the length-bucketed batches cna_fast runs:
    (batch, attention mask over prefix + prompt, whether the batch continues the prefix)."""
    tokens = shared_prefix(tokenizer) if use_prefix else []
    pad_id = pad_token_id(tokenizer)
    batches = []
    for planned in plan_batches(encode_prompts(tokenizer, prompts), [0] * len(prompts), batch_size, tokens):
        offset = len(tokens) if planned.uses_prefix else 0
        batch, mask = pad_after_prefix(planned.sequences, planned.labels, pad_id, offset)
        batches.append((batch, mask, planned.uses_prefix))
    return tokens, batches
