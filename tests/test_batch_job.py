"""The streaming batch job: continuous batching against transformers' generate, steering against folded
weights, per-record overrides against separate runs, SIGKILL + resume against an uninterrupted run."""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn

from cna_fast import get_adapter
from cna_fast.jobs import generate_to_file
from cna_fast.jobs import sidecar_path
from cna_fast.batching import encode_prompts
from cna_fast.circuit import Circuit
from cna_fast.cli import main
from cna_fast.errors import CNAError
from tests.tiny import DOWN_PATHS, build_tiny_model, build_tokenizer

PROMPTS = ["zebra", "what is the capital of france and why is it famous", "bread and salt",
           "the quick brown fox jumps", "explain photosynthesis to a child in simple words please",
           "how do i bake bread", "rome", "a zebra and a fox", "write a python function that sorts", "savanna"]
NEW_TOKENS = 10
ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------- helpers


def sharp_model(tokenizer, arch: str = "llama", **overrides) -> nn.Module:
    """A tiny model with scaled-up matrices (at the default init every prompt generates the same text) whose
    end-of-sequence token is one it often generates mid-answer, so rows finish at different steps."""
    model = build_tiny_model(arch, len(tokenizer), **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(8.0)
    seen: Counter = Counter()
    for ids in encode_prompts(tokenizer, PROMPTS):
        out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=2)[0, len(ids):].tolist()
        seen.update(set(out[2:]) - set(out[:2]))  # tokens that first appear after a few steps
    model.generation_config.eos_token_id = [seen.most_common(1)[0][0], tokenizer.eos_token_id]
    return model


def make_circuit(model: nn.Module, layers: list[int], neurons: list[int]) -> Circuit:
    n = len(layers)
    values = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    return Circuit(layers=layers, neurons=neurons, scores=values, deltas=values.clone(), mean_positive=values.clone(),
                   mean_negative=torch.zeros(n), std_positive=torch.ones(n), std_negative=torch.ones(n),
                   meta={"architecture": get_adapter(model).architecture()})


def wide_circuit(model: nn.Module, seed: int = 0) -> Circuit:
    """24 neurons per layer in layers 1-3: enough to change generations."""
    generator = torch.Generator().manual_seed(seed)
    layers, neurons = [], []
    for layer in (1, 2, 3):
        picked = torch.randperm(96, generator=generator)[:24].tolist()
        layers += [layer] * len(picked)
        neurons += picked
    return make_circuit(model, layers, neurons)


def folded_copy(model: nn.Module, circuit: Circuit, multiplier: float) -> nn.Module:
    """A copy whose down-projection columns of the circuit neurons are scaled by hand (independent of export)."""
    folded = copy.deepcopy(model)
    blocks, down = DOWN_PATHS[model.config.model_type]
    with torch.no_grad():
        for layer, neuron in zip(circuit.layers.tolist(), circuit.neurons.tolist()):
            folded.get_submodule(blocks)[layer].get_submodule(down).weight[:, neuron] *= multiplier
    return folded


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def read_records(path: Path) -> dict:
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    by_id = {line["id"]: line for line in lines}
    assert len(by_id) == len(lines), "duplicate records"
    return by_id


def run_job(model, tokenizer, prompts: Path, out: Path, **options) -> dict:
    options = {"max_new_tokens": NEW_TOKENS, "batch_size": 3, "progress": False, **options}
    generate_to_file(model, tokenizer, prompts, out, **options)
    return read_records(out)


@pytest.fixture
def prompt_file(tmp_path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS * 2) + "\n")
    return path


@pytest.fixture(scope="module")
def model_and_tokenizer():
    tokenizer = build_tokenizer()
    return sharp_model(tokenizer), tokenizer


# ----------------------------------------------------------------------------------------------- engine


@pytest.mark.parametrize("arch, batch_size", [("llama", 1), ("llama", 3), ("llama", 8), ("gpt2", 4),
                                               ("mistral-window", 4)])
def test_continuous_batching_equals_generate_one_prompt_at_a_time(model_and_tokenizer, prompt_file, tmp_path, arch,
                                                                  batch_size):
    """A sliding window (mistral-window) has cache layers that cannot be merged: refills wait for an empty batch."""
    model, tokenizer = model_and_tokenizer
    if arch == "mistral-window":
        model = sharp_model(tokenizer, "mistral", sliding_window=16)
    elif arch != "llama":
        model = sharp_model(tokenizer, arch)
    records = run_job(model, tokenizer, prompt_file, tmp_path / "out.jsonl", batch_size=batch_size)
    eos = set(model.generation_config.eos_token_id)
    assert len(records) == 2 * len(PROMPTS)
    for line, ids in enumerate(encode_prompts(tokenizer, PROMPTS * 2), start=1):
        reference = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                   pad_token_id=2)[0, len(ids):].tolist()
        record = records[line]
        assert record["output"] == tokenizer.decode(reference, skip_special_tokens=True).strip()
        assert record["output_tokens"] == len(reference) and record["prompt_tokens"] == len(ids)
        assert record["finish_reason"] == ("stop" if reference[-1] in eos else "length")
    reasons = Counter(record["finish_reason"] for record in records.values())
    assert reasons["stop"] >= 3 and reasons["length"] >= 3, "rows must finish at different steps"


def test_multiplier_one_is_unsteered_and_any_multiplier_equals_folded_weights(model_and_tokenizer, prompt_file,
                                                                              tmp_path):
    model, tokenizer = model_and_tokenizer
    circuit = wide_circuit(model)
    unsteered = run_job(model, tokenizer, prompt_file, tmp_path / "plain.jsonl")
    identity = run_job(model, tokenizer, prompt_file, tmp_path / "one.jsonl", circuits=circuit, multiplier=1.0)
    assert [r["output"] for r in identity.values()] == [unsteered[i]["output"] for i in identity]
    for multiplier in (0.0, 2.0):
        steered = run_job(model, tokenizer, prompt_file, tmp_path / f"m{multiplier}.jsonl",
                          circuits=circuit, multiplier=multiplier, batch_size=4)
        folded = run_job(folded_copy(model, circuit, multiplier), tokenizer, prompt_file,
                         tmp_path / f"f{multiplier}.jsonl")
        assert {i: r["output"] for i, r in steered.items()} == {i: r["output"] for i, r in folded.items()}
        assert any(steered[i]["output"] != unsteered[i]["output"] for i in steered), "steering must change text"
        assert all(r["multiplier"] == multiplier and r["circuit"] == "circuit" for r in steered.values())


@pytest.mark.parametrize("positions", ["prompt", "generated"])
def test_steered_positions_equal_generate_one_prompt_at_a_time(model_and_tokenizer, tmp_path, positions):
    from cna_fast.steering import generate

    model, tokenizer = model_and_tokenizer
    circuit = wide_circuit(model)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    records = run_job(model, tokenizer, prompts, tmp_path / "out.jsonl", circuits=circuit, positions=positions,
                      batch_size=4)
    reference = generate(model, tokenizer, PROMPTS, circuits=circuit, multiplier=0.0, positions=positions,
                         max_new_tokens=NEW_TOKENS, batch_size=1, progress=False)
    assert [records[line]["output"] for line in range(1, len(PROMPTS) + 1)] == reference


def test_per_record_circuit_and_multiplier_equal_separate_runs(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    circuits = {"a": wide_circuit(model, seed=1), "b": wide_circuit(model, seed=2)}
    settings = [("a", 0.0), ("b", 0.0), ("a", 2.0), ("b", 1.5), ("a", 1.0)]
    records = [{"id": f"r{i}", "prompt": prompt, "circuit": settings[i % 5][0], "multiplier": settings[i % 5][1]}
               for i, prompt in enumerate(PROMPTS * 2)]
    mixed = run_job(model, tokenizer, write_jsonl(tmp_path / "mixed.jsonl", records), tmp_path / "out.jsonl",
                    circuits=circuits, batch_size=4)
    assert len(mixed) == len(records)
    for name, multiplier in settings:
        subset = [{"id": r["id"], "prompt": r["prompt"]} for r in records
                  if (r["circuit"], r["multiplier"]) == (name, multiplier)]
        alone = run_job(model, tokenizer, write_jsonl(tmp_path / f"{name}{multiplier}.jsonl", subset),
                        tmp_path / f"out-{name}{multiplier}.jsonl", circuits=circuits[name], multiplier=multiplier)
        for record_id, record in alone.items():
            assert mixed[record_id]["output"] == record["output"]
            assert (mixed[record_id]["circuit"], mixed[record_id]["multiplier"]) == (name, multiplier)


def test_sampling_is_reproducible_per_record_whatever_the_batch(model_and_tokenizer, prompt_file, tmp_path):
    model, tokenizer = model_and_tokenizer
    options = {"do_sample": True, "temperature": 1.5, "top_p": 0.9}
    one = run_job(model, tokenizer, prompt_file, tmp_path / "one.jsonl", batch_size=1, seed=7, **options)
    many = run_job(model, tokenizer, prompt_file, tmp_path / "many.jsonl", batch_size=6, seed=7, **options)
    other = run_job(model, tokenizer, prompt_file, tmp_path / "other.jsonl", batch_size=6, seed=8, **options)
    assert {i: r["output"] for i, r in one.items()} == {i: r["output"] for i, r in many.items()}
    assert any(one[i]["output"] != other[i]["output"] for i in one), "another seed must change some sample"
    assert len({one[i]["output"] for i in (1, 11)}) == 2, "the same prompt under two ids samples differently"


# ----------------------------------------------------------------------------------------------- resume


def test_torn_last_line_is_repaired_and_finished_records_are_kept(model_and_tokenizer, prompt_file, tmp_path):
    model, tokenizer = model_and_tokenizer
    out = tmp_path / "out.jsonl"
    reference = run_job(model, tokenizer, prompt_file, out)
    lines = out.read_bytes().splitlines(keepends=True)
    kept, torn = lines[:7], lines[7][:len(lines[7]) // 2]
    out.write_bytes(b"".join(kept) + torn)
    resumed = run_job(model, tokenizer, prompt_file, out)
    assert resumed == reference
    assert out.read_bytes().startswith(b"".join(kept))  # finished records are never rewritten


def test_resume_refuses_other_settings_and_foreign_files(model_and_tokenizer, prompt_file, tmp_path):
    model, tokenizer = model_and_tokenizer
    circuit = wide_circuit(model)
    out = tmp_path / "out.jsonl"
    run_job(model, tokenizer, prompt_file, out, circuits=circuit, multiplier=0.0)
    before = out.read_bytes()
    with pytest.raises(CNAError, match="multiplier"):
        run_job(model, tokenizer, prompt_file, out, circuits=circuit, multiplier=2.0)
    with pytest.raises(CNAError, match="max_new_tokens"):
        run_job(model, tokenizer, prompt_file, out, circuits=circuit, multiplier=0.0, max_new_tokens=3)
    assert out.read_bytes() == before
    run_job(model, tokenizer, prompt_file, out, circuits=circuit, multiplier=0.0, batch_size=5)  # speed only: fine
    assert out.read_bytes() == before
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text('{"mine": 1}\n')
    with pytest.raises(CNAError, match="not written by"):
        run_job(model, tokenizer, prompt_file, foreign)
    assert foreign.read_text() == '{"mine": 1}\n' and not sidecar_path(foreign).exists()


def test_bad_overrides_raise_or_are_skipped(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    circuit = wide_circuit(model)
    records = [{"prompt": "zebra"}, {"prompt": "rome", "circuit": "nope"}, {"prompt": "bread", "multiplier": "x"},
               {"id": 1, "prompt": "fox"}, {"prompt": "savanna", "multiplier": 3}]
    prompts = write_jsonl(tmp_path / "p.jsonl", records)
    with pytest.raises(CNAError, match=r"p.jsonl:2: circuit 'nope' is not one of"):
        run_job(model, tokenizer, prompts, tmp_path / "a.jsonl", circuits={"main": circuit})
    summary = generate_to_file(model, tokenizer, prompts, tmp_path / "b.jsonl", circuits={"main": circuit},
                               skip_bad=True, max_new_tokens=3, progress=False)
    assert summary.written == 2 and len(summary.bad) == 3
    assert "duplicate id 1" in summary.bad[2]
    assert {r["id"]: r["multiplier"] for r in read_records(tmp_path / "b.jsonl").values()} == {1: 0.0, 5: 3.0}


# ----------------------------------------------------------------------------------------------- CLI + SIGKILL


@pytest.fixture(scope="module")
def job_files(tmp_path_factory, model_and_tokenizer):
    """The sharp model saved as a folder, a circuit file, and 60 jsonl prompts with string ids."""
    model, tokenizer = model_and_tokenizer
    folder = tmp_path_factory.mktemp("job")
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    wide_circuit(model).save(folder / "circuit.safetensors")
    records = [{"id": f"q{i}", "prompt": f"{PROMPTS[i % len(PROMPTS)]} {i}"} for i in range(60)]
    return folder, write_jsonl(folder / "prompts.jsonl", records)


def cli_args(folder: Path, prompts: Path, out: Path) -> list[str]:
    return ["generate", "--model", str(folder / "model"), "--circuit", str(folder / "circuit.safetensors"),
            "--multiplier", "0", "--prompts", str(prompts), "--out", str(out), "--max-new-tokens", "12",
            "--batch-size", "4", "--quiet"]


def kill_after_lines(jobs: list[tuple[list[str], Path, int]]) -> None:
    """Run `python -m cna_fast ARGS` for every job at once (they mostly wait on imports); SIGKILL each as soon
    as its output holds at least its number of lines."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    running = [(subprocess.Popen([sys.executable, "-m", "cna_fast", *args], env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE), out, lines) for args, out, lines in jobs]
    try:
        while any(process.poll() is None for process, _, _ in running):
            for process, out, lines in running:
                if process.poll() is None and out.exists() and out.read_bytes().count(b"\n") >= lines:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
            time.sleep(0.002)
    finally:
        for process, _, _ in running:
            if process.poll() is None:
                process.kill()
    for process, _, _ in running:
        assert process.wait() in (0, -signal.SIGKILL), process.stderr.read().decode()


def test_sigkill_at_random_points_then_resume_equals_uninterrupted_run(job_files, tmp_path):
    folder, prompts = job_files
    reference = tmp_path / "reference.jsonl"
    assert main(cli_args(folder, prompts, reference)) == 0
    kill_points = random.Random(os.getpid()).sample(range(1, 55), 3)
    outs = [tmp_path / f"killed-{lines}.jsonl" for lines in kill_points]
    kill_after_lines([(cli_args(folder, prompts, out), out, lines) for out, lines in zip(outs, kill_points)])
    for out, lines in zip(outs, kill_points):
        whole_lines = out.read_bytes().split(b"\n")[:-1]  # a torn last line is repaired by the next run
        ids = [json.loads(line)["id"] for line in whole_lines]
        assert len(ids) >= lines and len(set(ids)) == len(ids)
        assert main(cli_args(folder, prompts, out)) == 0
        assert read_records(out) == read_records(reference)


def test_cli_named_circuits_and_per_record_overrides(job_files, tmp_path, capsys):
    folder, _ = job_files
    circuit = str(folder / "circuit.safetensors")
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "zebra", "circuit": "up", "multiplier": 2},
                                                 {"prompt": "rome"}])
    args = ["generate", "--model", str(folder / "model"), "--circuit", f"down={circuit}", "--circuit", f"up={circuit}",
            "--prompts", str(prompts), "--max-new-tokens", "4", "--quiet"]
    assert main([*args, "--out", str(tmp_path / "out.jsonl")]) == 0
    records = read_records(tmp_path / "out.jsonl")
    assert {i: (r["circuit"], r["multiplier"]) for i, r in records.items()} == {1: ("up", 2.0), 2: ("down", 0.0)}
    assert main(args) == 2
    assert "need --out" in capsys.readouterr().err
