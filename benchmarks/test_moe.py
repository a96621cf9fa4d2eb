"""Capture + statistics overhead on a tiny-but-not-trivial mixture-of-experts model.

A random-weight Qwen3-MoE: 8 layers, hidden 256, 32 experts of width 128, top-4 routing
(grouped_mm, transformers' default), 64 + 64 prompts. cna_fast's MoE capture (effective
statistics of every routed neuron, float64 moments) against the floor: a bare forward of the
model body on the same batches, without hooks or statistics (with the shared-prefix KV cache for
"last", as cna_fast runs it; full sequences for "all", where MoE capture runs the prefix with
each prompt).

    python -m pytest benchmarks/test_moe.py --benchmark-json=benchmarks/results/moe.json
"""
import pytest
import torch

from cna_fast import capture_contrast
from cna_fast.batching import encode_prompts, pad_batch, pad_token_id, plan_batches, shared_prefix
from tests.test_streaming import varied_prompts
from tests.tiny import build_tokenizer
from tests.tiny_moe import build_tiny_moe

BATCH_SIZE = 32
ROUNDS = 5
PER_SIDE = 256
CONFIG = dict(num_hidden_layers=8, hidden_size=256, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def moe_setup():
    tokenizer = build_tokenizer()
    model = build_tiny_moe("qwen3_moe", len(tokenizer), experts_implementation="grouped_mm", **CONFIG)
    return model, tokenizer, varied_prompts(PER_SIDE, 1, "zebra "), varied_prompts(PER_SIDE, 2)


def _record(benchmark, positive, negative) -> None:
    benchmark.extra_info["prompts"] = len(positive) + len(negative)
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("position", ["last", "all"])
def test_moe_capture(benchmark, moe_setup, position):
    model, tokenizer, positive, negative = moe_setup
    stats = benchmark.pedantic(lambda: capture_contrast(model, tokenizer, positive, negative, reduction=position,
                                                        batch_size=BATCH_SIZE, progress=False),
                               rounds=ROUNDS, warmup_rounds=1)
    assert stats.routed.mean.shape == (8, 32, 2, 128)
    _record(benchmark, positive, negative)


def _floor_batches(model, tokenizer, prompts: list[str], use_prefix: bool):
    """The batches cna_fast runs (length-sorted), as model-body inputs, and the shared prefix's cache (or None)."""
    tokens = shared_prefix(tokenizer) if use_prefix else []
    pad_id = pad_token_id(tokenizer)
    batches = []
    for planned in plan_batches(encode_prompts(tokenizer, prompts), [0] * len(prompts), BATCH_SIZE, tokens):
        offset = len(tokens) if planned.uses_prefix else 0
        batch = pad_batch(planned.sequences, planned.labels, pad_id, "right", position_offset=offset)
        mask = torch.cat([torch.ones(len(planned.sequences), offset, dtype=torch.long), batch.attention_mask], dim=1)
        batches.append((batch, mask, planned.uses_prefix))
    return tokens, batches


@pytest.mark.parametrize("position", ["last", "all"])
def test_moe_floor_body_forward(benchmark, moe_setup, position):
    """The same batches through the bare model body: no hooks, no statistics (the prefix cache for "last")."""
    from transformers import DynamicCache

    model, tokenizer, positive, negative = moe_setup
    tokens, batches = _floor_batches(model, tokenizer, positive + negative, use_prefix=position == "last")
    prefix_kv = None
    if tokens:  # the prefix's keys/values are computed once, outside the timed region, as in cna_fast
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model.base_model(input_ids=torch.tensor([tokens]), past_key_values=cache, use_cache=True)
        prefix_kv = [(layer.keys, layer.values) for layer in cache.layers]

    def run() -> None:
        with torch.inference_mode():
            for batch, mask, with_prefix in batches:
                rows = batch.input_ids.shape[0]
                cache = DynamicCache(ddp_cache_data=[(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1))
                                                     for k, v in prefix_kv], config=model.config) if with_prefix \
                    else None
                model.base_model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                 past_key_values=cache, use_cache=cache is not None)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, positive, negative)
