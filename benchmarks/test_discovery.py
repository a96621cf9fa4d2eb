"""Discovery throughput on the embedded default model, 128 + 128 prompts.

cna_fast.discover against (a) the naive reference (one prompt per full forward pass, pre-hooks)
and (b) the floor: a bare batched forward of the model body on the same batches cna_fast builds,
without hooks or statistics, once with the shared-prefix KV cache (what cna_fast does) and once
on the full sequences.

    python -m pytest benchmarks/test_discovery.py --benchmark-json=benchmarks/results/discovery.json
"""
import torch

import cna_fast
from cna_fast import get_adapter
from cna_fast.capture import SharedPrefix
from benchmarks.floor import floor_batches
from tests.naive_reference import naive_discover

BATCH_SIZE = 32  # the default: at most 32 prompts per forward pass
ROUNDS = 3


def _record(benchmark, n_prompts: int) -> None:
    benchmark.extra_info["prompts"] = n_prompts
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["prompts_per_s"] = n_prompts / benchmark.stats.stats.mean


def test_cna_fast_discover(benchmark, default_model, contrast_prompts):
    model, tokenizer = default_model
    positive, negative = contrast_prompts
    circuit = benchmark.pedantic(
        lambda: cna_fast.discover(model, tokenizer, positive, negative, batch_size=BATCH_SIZE, progress=False),
        rounds=ROUNDS, warmup_rounds=1,
    )
    assert len(circuit) == 46
    _record(benchmark, len(positive) + len(negative))


def test_naive_reference(benchmark, default_model, contrast_prompts):
    model, tokenizer = default_model
    positive, negative = contrast_prompts
    benchmark.pedantic(lambda: naive_discover(model, tokenizer, positive, negative, top_k=46), rounds=2,
                       warmup_rounds=0)
    _record(benchmark, len(positive) + len(negative))


def _floor_batches(model, tokenizer, prompts: list[str], use_prefix: bool):
    """The batches cna_fast runs (length-sorted), as model-body inputs, plus the shared prefix (or None)."""
    tokens, batches = floor_batches(tokenizer, prompts, BATCH_SIZE, use_prefix)
    # Computing the prefix's keys/values once happens outside the timed region, as in cna_fast.
    layers = list(range(get_adapter(model).num_layers))
    prefix = SharedPrefix(model, tokens, layers, keep_rows=False) if tokens else None
    return prefix, batches


def _run_floor(model, prefix, batches) -> None:
    body = model.base_model
    with torch.inference_mode():
        for batch, mask, with_prefix in batches:
            cache = prefix.cache_for(batch.input_ids.shape[0]) if with_prefix else None
            body(input_ids=batch.input_ids, attention_mask=mask, position_ids=batch.position_ids,
                 past_key_values=cache, use_cache=cache is not None)


def test_floor_body_forward_prefix_cached(benchmark, default_model, contrast_prompts):
    model, tokenizer = default_model
    prompts = contrast_prompts[0] + contrast_prompts[1]
    with torch.inference_mode():
        prefix, batches = _floor_batches(model, tokenizer, prompts, use_prefix=True)
    benchmark.pedantic(lambda: _run_floor(model, prefix, batches), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, len(prompts))


def test_floor_body_forward_full_sequences(benchmark, default_model, contrast_prompts):
    model, tokenizer = default_model
    prompts = contrast_prompts[0] + contrast_prompts[1]
    prefix, batches = _floor_batches(model, tokenizer, prompts, use_prefix=False)
    benchmark.pedantic(lambda: _run_floor(model, prefix, batches), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, len(prompts))
