"""The batch job on the embedded default model (float32): 512 prompts x up to 64 new tokens, greedy.

- overhead: the continuous-batching engine steered (the 0.1% French circuit at multiplier 0) vs
  unsteered (target: <= 3% slower);
- engine: the continuous-batching engine vs today's static batches (`steering.generate`, the same
  batch size, same circuit) in new tokens per second (target: >= 1.5x).

Both engines stop a row at its end-of-sequence token, so "new tokens" are the tokens of the answers
(the engine's count; greedy answers are the same in both). One round each: this is minutes of CPU.

    python -m pytest benchmarks/test_batch_job.py --benchmark-json=benchmarks/results/batch_job.json

CNA_BENCH_BATCH_PROMPTS=N runs fewer prompts and CNA_BENCH_THREADS=T sets torch's threads (both are
recorded in the results), for a machine too busy for the full run.
"""
import json
import os
import time

import pytest
import torch

import cna_fast
from cna_fast.batch_job import generate_to_file
from cna_fast.batching import encode_prompts
from cna_fast.prompts import bundled_prompts
from cna_fast.steering import generate

N_PROMPTS = int(os.environ.get("CNA_BENCH_BATCH_PROMPTS", "512"))  # fewer only when the machine is too busy
THREADS = os.environ.get("CNA_BENCH_THREADS")  # 1 on an oversubscribed machine: 2 OpenMP threads then spin-wait
NEW_TOKENS = 64
BATCH_SIZE = 16
_TOKENS: dict[str, int] = {}
_LENGTHS: dict[str, dict[int, int]] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if THREADS:
        torch.set_num_threads(int(THREADS))
    model, tokenizer = cna_fast.load_model()
    circuit = cna_fast.discover(model, tokenizer, bundled_prompts("french_questions"),
                                bundled_prompts("english_questions"), progress=False)
    pool = bundled_prompts("french_heldout") + bundled_prompts("english_questions")
    prompts = [pool[i % len(pool)] for i in range(N_PROMPTS)]
    path = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts))
    return model, tokenizer, circuit, prompts, path


def _job(setup, steered: bool, batch_size: int) -> int:
    """Run the batch job; keep each record's new-token count (by prompt index) for the static-batch analysis."""
    model, tokenizer, circuit, _, path = setup
    out = path.with_name(f"out-{steered}-{batch_size}-{time.monotonic_ns()}.jsonl")
    summary = generate_to_file(model, tokenizer, path, out, circuits=circuit if steered else None, multiplier=0.0,
                               max_new_tokens=NEW_TOKENS, batch_size=batch_size, progress=False)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    _LENGTHS["steered" if steered else "unsteered"] = {record["id"] - 1: record["output_tokens"] for record in records}
    return summary.new_tokens


def _static_row_steps(setup, lengths: dict[int, int]) -> int:
    """Decode row-steps today's static batches compute: every row runs until the longest of its batch ends."""
    _, tokenizer, _, prompts, _ = setup
    encoded = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))  # as steering.generate batches them
    batches = [order[start:start + BATCH_SIZE] for start in range(0, len(order), BATCH_SIZE)]
    return sum(len(rows) * max(lengths[i] for i in rows) for rows in batches)


def _record(benchmark, tokens: int) -> None:
    benchmark.extra_info["new_tokens"] = tokens
    benchmark.extra_info["tokens_per_s"] = tokens / benchmark.stats.stats.mean
    benchmark.extra_info["threads"] = torch.get_num_threads()
    benchmark.extra_info["prompts"] = N_PROMPTS
    print(f"\n{benchmark.name}: {tokens} new tokens in {benchmark.stats.stats.mean:.1f} s = "
          f"{benchmark.extra_info['tokens_per_s']:.1f} tok/s", flush=True)


def _engine(benchmark, setup, steered: bool) -> None:
    tokens = benchmark.pedantic(lambda: _job(setup, steered, BATCH_SIZE), rounds=1, warmup_rounds=0)
    _TOKENS["steered" if steered else "unsteered"] = tokens
    _record(benchmark, tokens)


def test_continuous_engine_steered(benchmark, setup):
    _engine(benchmark, setup, True)


def test_static_batches(benchmark, setup):
    """Today's engine: length-sorted static batches through transformers' generate. Its waste (rows that
    finished early but still run) is the most continuous batching can win when a step costs the same."""
    model, tokenizer, circuit, prompts, _ = setup
    benchmark.pedantic(lambda: generate(model, tokenizer, prompts, circuits=circuit, multiplier=0.0,
                                        max_new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, progress=False),
                       rounds=1, warmup_rounds=0)
    tokens = _TOKENS.get("steered") or _job(setup, True, BATCH_SIZE)
    row_steps = _static_row_steps(setup, _LENGTHS["steered"])
    benchmark.extra_info["static_row_steps"] = row_steps
    benchmark.extra_info["useful_fraction"] = tokens / row_steps
    print(f"\nstatic batches compute {row_steps} decode row-steps for {tokens} new tokens "
          f"({100 * tokens / row_steps:.1f}% useful)", flush=True)
    _record(benchmark, tokens)


def test_continuous_engine_unsteered(benchmark, setup):
    _engine(benchmark, setup, False)


def test_steering_overhead_same_answers(benchmark, setup):
    """Steering's own cost on the same engine: the circuit at multiplier 1 (every hook runs, the answers are
    the unsteered ones, so both runs do identical work) against no steering, in interleaved rounds so that
    load on a shared machine hits both alike. The median of the per-round ratios is the overhead."""
    model, tokenizer, circuit, prompts, path = setup
    rounds = int(os.environ.get("CNA_BENCH_OVERHEAD_ROUNDS", "3"))
    subset = path.with_name("overhead-prompts.jsonl")
    subset.write_text("".join(json.dumps({"prompt": prompt}) + "\n" for prompt in prompts[:64]))

    def run(steered: bool) -> float:
        out = subset.with_name(f"overhead-{steered}-{time.monotonic_ns()}.jsonl")
        started = time.perf_counter()
        generate_to_file(model, tokenizer, subset, out, circuits=circuit if steered else None, multiplier=1.0,
                         max_new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, progress=False)
        return time.perf_counter() - started

    ratios = []

    def interleaved() -> None:
        for _ in range(rounds):
            plain, steered = run(False), run(True)
            ratios.append(steered / plain)

    benchmark.pedantic(interleaved, rounds=1, warmup_rounds=0)
    ratios.sort()
    benchmark.extra_info["overhead_median"] = ratios[len(ratios) // 2] - 1.0
    benchmark.extra_info["overhead_rounds"] = [ratio - 1.0 for ratio in ratios]
    print(f"\nsteering overhead at multiplier 1 (same answers), {rounds} interleaved rounds of 64 prompts: "
          f"median {100 * (ratios[len(ratios) // 2] - 1):+.1f}%, all {[f'{100 * (r - 1):+.1f}%' for r in ratios]}",
          flush=True)
