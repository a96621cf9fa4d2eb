"""Capture + statistics overhead on a tiny-but-not-trivial mixture-of-experts model.

A random-weight Qwen3-MoE: 8 layers, hidden 256, 32 experts of width 128, top-4 routing
(grouped_mm, transformers' default), 256 + 256 prompts. cna_fast's MoE capture (effective
statistics of every routed neuron, float64 moments) against the floor: a bare forward of the
model body on the same batches, without hooks or statistics (with the shared-prefix KV cache for
"last", as cna_fast runs it; full sequences for "all", where MoE capture runs the prefix with
each prompt), timed in the same round so that a shared machine's load affects both alike.

    python -m pytest benchmarks/test_moe.py --benchmark-json=benchmarks/results/moe.json
"""
import statistics
import time

import pytest
import torch

from cna_fast import capture_contrast
from benchmarks.floor import floor_batches
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


def _floor(model, tokenizer, prompts: list[str], use_prefix: bool):
    """A function that runs the same batches through the bare model body: no hooks, no statistics."""
    from transformers import DynamicCache

    tokens, batches = floor_batches(tokenizer, prompts, BATCH_SIZE, use_prefix)
    prefix_kv = None
    if tokens:  # the prefix's keys/values are computed once, outside the timed region
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

    return run


@pytest.mark.parametrize("reduction", ["last", "all"])
def test_moe_capture_overhead(benchmark, moe_setup, reduction):
    """Capture + statistics timed per round, each round right after a bare forward of the same batches.

    extra_info["overhead"]: median over rounds of capture / floor - 1, so slow drifts of a shared
    machine's load hit both sides of each ratio alike.
    """
    model, tokenizer, positive, negative = moe_setup
    floor = _floor(model, tokenizer, positive + negative, use_prefix=reduction == "last")
    floor_seconds = []

    def time_floor() -> None:
        started = time.perf_counter()
        floor()
        floor_seconds.append(time.perf_counter() - started)

    stats = benchmark.pedantic(lambda: capture_contrast(model, tokenizer, positive, negative, reduction=reduction,
                                                        batch_size=BATCH_SIZE, progress=False),
                               setup=time_floor, rounds=ROUNDS, warmup_rounds=1)
    assert stats.routed.mean.shape == (8, 32, 2, 128)
    capture_seconds = benchmark.stats.stats.data
    ratios = [capture / bare for capture, bare in zip(capture_seconds, floor_seconds[-len(capture_seconds):])]
    benchmark.extra_info.update(prompts=len(positive) + len(negative), threads=torch.get_num_threads(),
                                floor_seconds=floor_seconds[-len(capture_seconds):],
                                overhead=statistics.median(ratios) - 1.0)
