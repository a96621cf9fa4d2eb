"""The batch job on the embedded default model (float32): 512 prompts x up to 64 new tokens, greedy.

- overhead: steering's own cost on the continuous-batching engine: the 0.1% French circuit at
  multiplier 1 (same answers, same work) vs unsteered, timed in lockstep (target: <= 3% slower);
  the engine steered at multiplier 0 and unsteered are also timed one after the other;
- engine: the continuous-batching engine vs today's static batches (`steering.generate`, the same
  batch size, same circuit) in new tokens per second (target: >= 1.5x).

Both engines stop a row at its end-of-sequence token, so "new tokens" are the tokens of the answers
(the engine's count; greedy answers are the same in both). One round each: this is minutes of CPU.

    python -m pytest benchmarks/test_batch_job.py --benchmark-json=benchmarks/results/batch_job.json

CNA_BENCH_BATCH_PROMPTS=N runs fewer prompts and CNA_BENCH_THREADS=T sets torch's threads (both are
recorded in the results), for a machine too busy for the full run. CNA_BENCH_NEW_TOKENS=T allows
longer answers, whose uneven ends are what continuous batching wins back.
"""
import functools
import json
import os
import time

import pytest
import torch

import cna_fast
from cna_fast.jobs import generate_to_file
from cna_fast.batching import encode_prompts
from cna_fast.prompts import bundled_prompts
from cna_fast.steering import generate

from benchmarks.lockstep import lockstep

N_PROMPTS = int(os.environ.get("CNA_BENCH_BATCH_PROMPTS", "512"))  # fewer only when the machine is too busy
THREADS = os.environ.get("CNA_BENCH_THREADS")  # 1 on an oversubscribed machine: 2 OpenMP threads then spin-wait
NEW_TOKENS = int(os.environ.get("CNA_BENCH_NEW_TOKENS", "64"))  # longer answers stop more unevenly
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
    benchmark.extra_info["max_new_tokens"] = NEW_TOKENS
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


def _lockstep_job(prompts: str, circuit: str | None, out: str, attach) -> dict:
    """One side of the overhead benchmark, in its own process (see benchmarks.lockstep): the batch job on
    its own copy of the model, steered with `circuit` at multiplier 1 or unsteered."""
    if THREADS:
        torch.set_num_threads(int(THREADS))
    model, tokenizer = cna_fast.load_model()
    circuits = cna_fast.Circuit.load(circuit) if circuit else None
    attach(model)
    summary = generate_to_file(model, tokenizer, prompts, out, circuits=circuits,
                               multiplier=1.0, max_new_tokens=NEW_TOKENS, batch_size=BATCH_SIZE, progress=False)
    return {"new_tokens": summary.new_tokens, "threads": torch.get_num_threads()}


def test_steering_overhead_lockstep(benchmark, setup):
    """Steering's own cost on the same engine, all 512 prompts x 64 tokens: the circuit at multiplier 1 (every
    hook and every rebuild of the per-row steering runs, and the answers are the unsteered ones, so both jobs do
    identical work) against no steering. The two jobs run in lockstep (benchmarks.lockstep), one model forward
    each in turn, so the machine's load hits both alike; the overhead is the ratio of their own times."""
    _, _, circuit, _, path = setup
    circuit_path = path.with_name("circuit.safetensors")
    circuit.save(circuit_path)
    outputs = {name: path.with_name(f"lockstep-{name}.jsonl") for name in ("unsteered", "steered")}
    jobs = {name: functools.partial(_lockstep_job, str(path), str(circuit_path) if name == "steered" else None,
                                    str(outputs[name])) for name in outputs}
    report = benchmark.pedantic(lambda: lockstep(jobs), rounds=1, warmup_rounds=0)
    answers = {name: [json.loads(line)["output"] for line in out.read_text().splitlines()]
               for name, out in outputs.items()}
    assert answers["steered"] == answers["unsteered"], "multiplier 1 must not change the answers"
    assert report["steered"]["turns"] == report["unsteered"]["turns"]
    overhead = report["steered"]["seconds"] / report["unsteered"]["seconds"] - 1.0
    tokens = report["steered"]["result"]["new_tokens"]
    benchmark.extra_info.update(
        overhead=overhead, forwards=report["steered"]["turns"], new_tokens=tokens, prompts=N_PROMPTS,
        threads=report["steered"]["result"]["threads"],
        seconds={name: side["seconds"] for name, side in report.items()})
    print(f"\nsteering overhead at multiplier 1 in lockstep, {N_PROMPTS} prompts x {NEW_TOKENS} tokens "
          f"({tokens} new tokens, {report['steered']['turns']} forwards each): unsteered "
          f"{report['unsteered']['seconds']:.1f} s, steered {report['steered']['seconds']:.1f} s, "
          f"overhead {100 * overhead:+.2f}%", flush=True)
