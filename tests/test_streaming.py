"""Long runs: lazily streamed prompt sources, bad records, over-long prompts, checkpoint and resume."""
import json
import os
import signal
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch

from cna_fast import Checkpoint, discover, load_model
from cna_fast.circuit import Circuit
from cna_fast.errors import CNAError
from cna_fast.prompts import PromptSource, read_prompts
from cna_fast.stats import NeuronStats
from tests.conftest import NEGATIVE, POSITIVE

WORDS = ["zebra", "stripes", "savanna", "quick", "brown", "fox", "bread", "flour", "python", "rome", "village"]


def varied_prompts(count: int, seed: int, marker: str = "") -> list[str]:
    """`count` distinct prompts of 2 to 8 words from the test vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    prompts = []
    for index in range(count):
        size = int(torch.randint(2, 9, (1,), generator=generator))
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (size,), generator=generator)]
        prompts.append(f"{marker}{' '.join(words)} {index}")
    return prompts


def test_txt_jsonl_csv_sources_read_records_lazily(tmp_path: Path):
    (tmp_path / "p.txt").write_text("first prompt\n\n  second prompt  \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "first prompt"}\n\n{"text": "second prompt", "id": 2}\n')
    (tmp_path / "p.csv").write_text('id,prompt\n1,first prompt\n2,"second\nprompt, on two lines"\n')
    assert list(PromptSource(tmp_path / "p.txt")) == ["first prompt", "second prompt"]
    assert list(PromptSource(tmp_path / "p.jsonl")) == ["first prompt", "second prompt"]
    assert list(PromptSource(tmp_path / "p.csv")) == ["first prompt", "second\nprompt, on two lines"]


BAD_CASES = {
    "missing-field": ('{"prompt": "fine"}\n{"question": "no prompt field"}\n{"prompt": "also fine"}\n', ".jsonl", 2,
                      "no 'prompt' or 'text' field"),
    "empty-text": ('{"prompt": "fine"}\n{"prompt": "   "}\n{"prompt": "also fine"}\n', ".jsonl", 2, "empty text"),
    "invalid-json": ('{"prompt": "fine"}\n{"prompt": broken\n{"prompt": "also fine"}\n', ".jsonl", 2, "not valid JSON"),
    "not-text": ('{"prompt": "fine"}\n{"prompt": 42}\n{"prompt": "also fine"}\n', ".jsonl", 2,
                 "expected text, got int"),
    "undecodable-txt": (b"fine\n\xff\xfe broken\nalso fine\n", ".txt", 2, "not valid UTF-8"),
    "undecodable-csv": (b"prompt\nfine\n\xff\xfe broken\nalso fine\n", ".csv", 3, "not valid UTF-8"),
    "empty-csv-value": ("id,prompt\n1,fine\n2,\n3,also fine\n", ".csv", 3, "empty text"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_records_stop_with_line_or_are_skipped_and_reported(tmp_path: Path, case: str):
    body, suffix, line, reason = BAD_CASES[case]
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    with pytest.raises(CNAError, match=f"prompts{suffix}:{line}: {reason}"):
        list(PromptSource(path))
    source = PromptSource(path, skip_bad=True)
    assert list(source) == ["fine", "also fine"]
    assert [(bad.line, bad.reason.split(" (")[0]) for bad in source.bad] == [(line, reason)]


def test_cli_skip_bad_reports_and_runs(model_dir, tmp_path: Path, capsys):
    from cna_fast.cli import main

    positive = tmp_path / "pos.jsonl"
    positive.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in POSITIVE) + '{"prompt": ""}\n')
    negative = tmp_path / "neg.txt"
    negative.write_text("\n".join(NEGATIVE))
    out = tmp_path / "c.safetensors"
    args = ["discover", "--positive", str(positive), "--negative", str(negative), "--model", str(model_dir),
            "--out", str(out), "--top-k", "3", "--quiet"]
    assert main(args) == 2 and not out.exists()
    assert f"pos.jsonl:{len(POSITIVE) + 1}: empty text" in capsys.readouterr().err
    assert main(args + ["--skip-bad"]) == 0
    assert f"skipped 1 bad records in {positive}" in capsys.readouterr().err
    assert Circuit.load(out).meta["n_positive"] == len(POSITIVE)


def test_hugging_face_dataset_saved_to_disk(tmp_path: Path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "dataset"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"instruction": POSITIVE, "other": [1, 2, 3, 4]})}) \
        .save_to_disk(str(folder))
    assert list(PromptSource(f"hf:{folder}:train:instruction")) == POSITIVE
    with pytest.raises(CNAError, match="no column 'missing'"):
        list(PromptSource(f"hf:{folder}:train:missing"))
    with pytest.raises(CNAError, match="hf:NAME:SPLIT:COLUMN"):
        PromptSource("hf:only-a-name")


def test_200k_prompt_jsonl_streams_with_flat_memory(tmp_path: Path):
    """Reading 200,000 records keeps at most a few records in memory, not the 10+ MB file."""
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for index in range(200_000):
            handle.write(json.dumps({"prompt": f"prompt number {index} about zebras and savannas"}) + "\n")
    size_mb = path.stat().st_size / 2**20
    tracemalloc.start()
    count = sum(1 for _ in PromptSource(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 200_000 and size_mb > 10
    assert peak < 1 * 2**20, f"streaming peak {peak / 2**20:.2f} MB for a {size_mb:.1f} MB file"
    tracemalloc.start()
    read_prompts(path)
    _, whole = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert whole > 10 * peak  # the eager reader, for comparison, holds every prompt


def test_long_prompts_truncate_with_warning_or_fail(tiny_llama, tokenizer):
    long = ["zebra " * 300 + "stripes", "fox " * 250]
    with pytest.warns(UserWarning, match="2 prompts were longer than 64 tokens"):
        circuit = discover(tiny_llama, tokenizer, long, NEGATIVE, top_k=3, max_length=64, progress=False)
    assert circuit.meta["n_positive"] == 2
    with pytest.raises(CNAError, match="prompt 1 has .* tokens, more than max_length=64"):
        discover(tiny_llama, tokenizer, long, NEGATIVE, top_k=3, max_length=64, on_long="error", progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context length: no truncation, no warning
        discover(tiny_llama, tokenizer, POSITIVE, NEGATIVE, top_k=3, progress=False)


def test_truncation_keeps_template_prefix_and_last_tokens(tiny_llama, tokenizer):
    """A truncated prompt is captured exactly as its kept tokens: the prefix plus the tail."""
    from cna_fast.batching import encode_prompts, shared_prefix
    from cna_fast.capture import Capturer

    capturer = Capturer(tiny_llama, tokenizer, max_length=40, progress=False)
    ids = encode_prompts(tokenizer, ["zebra " * 100])[0]
    kept = capturer.limit.fit(ids, 1)
    prefix = shared_prefix(tokenizer)
    assert len(kept) == 40 and kept[:len(prefix)] == prefix and kept[len(prefix):] == ids[len(ids) - 40 + len(prefix):]


def _write_sets(tmp_path: Path, count: int) -> tuple[Path, Path]:
    positive, negative = tmp_path / "pos.txt", tmp_path / "neg.txt"
    positive.write_text("\n".join(varied_prompts(count, 1, "zebra ")) + "\n")
    negative.write_text("\n".join(varied_prompts(count, 2)) + "\n")
    return positive, negative


def test_resume_after_crash_gives_the_uninterrupted_circuit(tiny_llama, tokenizer, tmp_path: Path):
    """A run stopped mid-stream (after a checkpoint) and resumed ends with bit-identical statistics."""
    positive, negative = varied_prompts(150, 1, "zebra "), varied_prompts(150, 2)
    settings = dict(top_k=6, batch_size=2, progress=False)  # windows of 64 prompts
    expected = discover(tiny_llama, tokenizer, positive, negative, **settings)
    checkpoint = tmp_path / "run.checkpoint"

    class Crash(Exception):
        pass

    def crashing(prompts, after):
        for index, prompt in enumerate(prompts):
            if index == after:
                raise Crash
            yield prompt

    # The negative set is only read after the positives; crash in the middle of it.
    with pytest.raises(Crash):
        _crash_run(tiny_llama, tokenizer, positive, negative, checkpoint, settings, crashing)
    saved = NeuronStats.load(checkpoint)
    assert 0 < saved.meta["consumed"] < 300
    resumed = discover(tiny_llama, tokenizer, positive, negative, checkpoint=Checkpoint(checkpoint, 64, resume=True),
                       **settings)
    assert torch.equal(resumed.neurons, expected.neurons) and torch.equal(resumed.layers, expected.layers)
    assert torch.equal(resumed.scores, expected.scores)
    assert NeuronStats.load(checkpoint).meta["consumed"] == 300


def _crash_run(model, tokenizer, positive, negative, checkpoint, settings, crashing):
    """Discovery whose negative prompts fail after 100 items, with the same checkpoint identity as a clean run."""
    from cna_fast.capture import capture_contrast
    from cna_fast.pipeline import run_identity
    from cna_fast.settings import CaptureSettings

    capture = CaptureSettings(batch_size=settings["batch_size"])
    identity = run_identity(model, tokenizer, positive, negative, CaptureSettings.build(capture, layers=range(4)))
    capture_contrast(model, tokenizer, positive, crashing(negative, 100), capture, progress=False,
                     checkpoint=Checkpoint(checkpoint, 64, identity))


def test_resume_with_changed_inputs_fails_clearly(tiny_llama, tokenizer, tmp_path: Path):
    checkpoint = tmp_path / "run.checkpoint"
    positive, negative = varied_prompts(40, 1, "zebra "), varied_prompts(40, 2)
    discover(tiny_llama, tokenizer, positive, negative, top_k=3, checkpoint=Checkpoint(checkpoint, 16), progress=False)
    with pytest.raises(CNAError, match=r"different inputs or settings \(negative changed\)"):
        discover(tiny_llama, tokenizer, positive, negative[:-1] + ["another prompt"], top_k=3,
                 checkpoint=Checkpoint(checkpoint, resume=True), progress=False)
    with pytest.raises(CNAError, match=r"\(reduction changed\)"):
        discover(tiny_llama, tokenizer, positive, negative, top_k=3, reduction="mean",
                 checkpoint=Checkpoint(checkpoint, resume=True), progress=False)
    with pytest.raises(CNAError, match="re-readable"):
        discover(tiny_llama, tokenizer, iter(positive), negative, top_k=3, checkpoint=checkpoint, progress=False)


def test_cli_run_killed_with_sigkill_resumes_to_the_same_circuit(model_dir, tmp_path: Path):
    """A real process killed (SIGKILL) after its first checkpoint; `--resume` finishes the same circuit."""
    positive, negative = _write_sets(tmp_path, 400)
    base = [sys.executable, "-m", "cna_fast", "discover", "--positive", str(positive), "--negative", str(negative),
            "--model", str(model_dir), "--top-k", "6", "--batch-size", "2", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    clean = tmp_path / "clean.safetensors"
    subprocess.run(base + ["--out", str(clean)], check=True, capture_output=True, env=env, timeout=300)

    out = tmp_path / "resumed.safetensors"
    checkpoint = tmp_path / "resumed.safetensors.checkpoint"
    process = subprocess.Popen(base + ["--out", str(out), "--checkpoint-every", "64"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    consumed = NeuronStats.load(checkpoint).meta["consumed"]
    assert 0 < consumed < 800, "the process must be killed mid-run for this test to mean anything"
    assert not out.exists()
    subprocess.run(base + ["--out", str(out), "--checkpoint-every", "64", "--resume"], check=True,
                   capture_output=True, env=env, timeout=300)
    resumed, reference = Circuit.load(out), Circuit.load(clean)
    assert torch.equal(resumed.neurons, reference.neurons) and torch.equal(resumed.scores, reference.scores)


def test_sharded_model_statistics_are_gathered(model_dir):
    """load_model with an explicit device_map still yields one set of statistics per layer, in layer order."""
    model, tokenizer = load_model(model_dir, device_map={"": "cpu"})
    circuit = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=4, progress=False)
    assert len(circuit) == 4
