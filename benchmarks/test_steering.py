"""Steered generation on the embedded default model (float32): 16 prompts x 64 new tokens, greedy.

- overhead: batched generation with the 0.1% French circuit (46 neurons, multiplier 0) vs no circuit;
- batching: the same steered generation batched (16 rows) vs one prompt at a time.

    python -m pytest benchmarks/test_steering.py --benchmark-json=benchmarks/results/steering.json
"""
import pytest
import torch

import cna_fast
from cna_fast.prompts import bundled_prompts
from cna_fast.steering import generate

N_PROMPTS = 16
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def setup():
    model, tokenizer = cna_fast.load_model()
    circuit = cna_fast.discover(model, tokenizer, bundled_prompts("french_questions"),
                                bundled_prompts("english_questions"), progress=False)
    return model, tokenizer, circuit, bundled_prompts("french_heldout")[:N_PROMPTS]


def _generate(setup, circuit: bool, batch_size: int) -> list[str]:
    model, tokenizer, found, prompts = setup
    return generate(model, tokenizer, prompts, circuits=found if circuit else None, multiplier=0.0,
                    max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, batch_size=batch_size, progress=False)


def _record(benchmark) -> None:
    benchmark.extra_info["tokens_per_s"] = N_PROMPTS * NEW_TOKENS / benchmark.stats.stats.mean
    benchmark.extra_info["threads"] = torch.get_num_threads()


@pytest.mark.parametrize("steered", [False, True], ids=["unsteered", "steered"])
def test_batched_generation(benchmark, setup, steered):
    benchmark.pedantic(lambda: _generate(setup, steered, N_PROMPTS), rounds=5, warmup_rounds=1)
    _record(benchmark)


def test_one_at_a_time_steered_generation(benchmark, setup):
    benchmark.pedantic(lambda: _generate(setup, True, 1), rounds=2, warmup_rounds=0)
    _record(benchmark)
