"""The naive CNA reference: one prompt per forward pass through the full model, a last-token
pre-hook on every down projection, mean difference, top-k of |delta|. Written independently of
cna_fast so that tests and benchmarks can compare against it."""
from __future__ import annotations

import torch


def naive_last_token_activations(model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """[prompts, layers, d_ff] float64 activations at the last prompt token, one prompt at a time."""
    downs = [layer.mlp.down_proj for layer in model.model.layers]
    captured: list[torch.Tensor] = [None] * len(downs)

    def make_hook(index: int):
        def hook(module, args):
            captured[index] = args[0][0, -1].to(torch.float64)
        return hook

    handles = [down.register_forward_pre_hook(make_hook(i)) for i, down in enumerate(downs)]
    rows = []
    try:
        with torch.no_grad():
            for prompt in prompts:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
                model(**ids)
                rows.append(torch.stack(captured))
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(rows)


def naive_discover(model, tokenizer, positive: list[str], negative: list[str], top_k: int):
    """(layer, neuron) pairs of the top-k |delta| neurons, in rank order, and the full delta [layers, d_ff]."""
    delta = (naive_last_token_activations(model, tokenizer, positive).mean(0)
             - naive_last_token_activations(model, tokenizer, negative).mean(0))
    flat = delta.abs().flatten().topk(top_k).indices
    width = delta.shape[1]
    return [(int(i) // width, int(i) % width) for i in flat], delta
