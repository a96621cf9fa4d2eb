"""Capture + statistics overhead on a tiny-but-not-trivial mixture-of-experts model.

A random-weight Qwen3-MoE: 8 layers, hidden 256, 32 experts of width 128, top-4 routing
(grouped_mm, transformers' default), 64 + 64 prompts. cna_fast's MoE capture (effective
statistics of every routed neuron, float64 moments) against the floor: a bare forward of the
model body on the same batches, without hooks or statistics (with the shared-prefix KV cache for
"last", as cna_fast runs it; full sequences for "all").

    python -m pytest benchmarks/test_moe.py --benchmark-json=benchmarks/results/moe.json
"""
import pytest
import torch

from cna_fast import capture_contrast
from cna_fast.capture import encode_prompts, pad_batch
from cna_fast.moe_capture import MoECapturer
from tests.test_streaming import varied_prompts
from tests.tiny import build_tokenizer
from tests.tiny_moe import build_tiny_moe

BATCH_SIZE = 32
ROUNDS = 5
CONFIG = dict(num_hidden_layers=8, hidden_size=256, moe_intermediate_size=128, num_experts=32, num_experts_per_tok=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=64)


@pytest.fixture(scope="module")
def moe_setup():
    tokenizer = build_tokenizer()
    model = build_tiny_moe("qwen3_moe", len(tokenizer), experts_implementation="grouped_mm", **CONFIG)
    return model, tokenizer, varied_prompts(64, 1, "zebra "), varied_prompts(64, 2)


def _record(benchmark, positive, negative) -> None:
    benchmark.extra_info["prompts"] = len(positive) + len(negative)
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("position", ["last", "all"])
def test_moe_capture(benchmark, moe_setup, position):
    model, tokenizer, positive, negative = moe_setup
    stats = benchmark.pedantic(lambda: capture_contrast(model, tokenizer, positive, negative, position=position,
                                                        batch_size=BATCH_SIZE, progress=False),
                               rounds=ROUNDS, warmup_rounds=1)
    assert stats.routed.mean.shape == (8, 32, 2, 128)
    _record(benchmark, positive, negative)


@pytest.mark.parametrize("position", ["last", "all"])
def test_moe_floor_body_forward(benchmark, moe_setup, position):
    """The same batches through the bare model body: no hooks, no statistics."""
    model, tokenizer, positive, negative = moe_setup
    capturer = MoECapturer(model, tokenizer, position=position, batch_size=BATCH_SIZE, progress=False)
    encoded = encode_prompts(tokenizer, positive + negative)
    batches = []
    for sequences, labels, with_prefix in capturer._batches(encoded, [0] * len(encoded)):
        offset = len(capturer.prefix) if with_prefix else 0
        batch = pad_batch(sequences, labels, capturer.pad_id, "right", position_offset=offset)
        mask = torch.cat([torch.ones(len(sequences), offset, dtype=torch.long), batch.attention_mask], dim=1)
        batches.append((batch, mask, with_prefix))
    if capturer.prefix:
        with torch.inference_mode(), capturer._make_recorder(record=True) as recorder:
            capturer._prepare_prefix(recorder)

    def run() -> None:
        with torch.inference_mode():
            for batch, mask, with_prefix in batches:
                cache = capturer._prefix_cache_for(batch.input_ids.shape[0]) if with_prefix else None
                model.base_model(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                                 past_key_values=cache, use_cache=cache is not None)

    benchmark.pedantic(run, rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, positive, negative)
