"""Data-parallel discovery with torch.distributed (gloo on CPU), launched with torchrun."""
import os
import socket
import subprocess
import sys

import torch

from cna_fast import discover, load_model
from cna_fast.circuit import Circuit
from cna_fast.stats import NeuronStats
from tests.conftest import NEGATIVE, POSITIVE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_torchrun_two_ranks_equals_one_process(model_dir, prompt_files, tmp_path):
    """Two gloo ranks, each streaming half the prompts, give the single-process circuit."""
    out = tmp_path / "distributed.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "cna_fast", "discover", "--distributed",
               "--positive", str(prompt_files[0]), "--negative", str(prompt_files[1]), "--model", str(model_dir),
               "--out", str(out), "--top-k", "8", "--score", "t", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = Circuit.load(out)
    model, tokenizer = load_model(model_dir)
    single = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=8, score="t", progress=False)
    assert torch.equal(distributed.layers, single.layers) and torch.equal(distributed.neurons, single.neurons)
    assert torch.allclose(distributed.scores, single.scores, rtol=1e-6, atol=0)
    assert distributed.meta["n_positive"] == len(POSITIVE) and distributed.meta["n_negative"] == len(NEGATIVE)


def test_distributed_without_torchrun_is_a_clear_error(model_dir, prompt_files, tmp_path, capsys):
    from cna_fast.cli import main

    env = {key: os.environ.pop(key) for key in ("RANK", "WORLD_SIZE") if key in os.environ}
    try:
        code = main(["discover", "--distributed", "--positive", str(prompt_files[0]), "--negative",
                     str(prompt_files[1]), "--model", str(model_dir), "--out", str(tmp_path / "c.safetensors")])
    finally:
        os.environ.update(env)
    assert code == 2
    assert "torchrun" in capsys.readouterr().err


def test_concat_joins_layer_shards_in_layer_order():
    """Per-device statistics (layers split across devices) join into one object sorted by layer."""
    rows = torch.randn(3, 10, 5, dtype=torch.float64) + 100
    labels = torch.tensor([0, 1] * 5)
    whole = NeuronStats([0, 1, 2], 5)
    whole.update(rows, labels)
    late, early = NeuronStats([2], 5), NeuronStats([0, 1], 5)
    late.update(rows[2:], labels)
    early.update(rows[:2], labels)
    joined = NeuronStats.concat([late, early])
    assert joined.layers == [0, 1, 2]
    assert torch.equal(joined.mean, whole.mean) and torch.equal(joined.m2, whole.m2)


def test_capture_on_explicitly_mapped_model_keeps_layers_on_their_devices(tokenizer):
    """A model loaded with an explicit device_map (all CPU here) captures like an unmapped one."""
    import tempfile

    from tests.tiny import build_tiny_model

    model = build_tiny_model("llama", len(tokenizer))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "cpu",
                      "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu",
                      "model.rotary_emb": "cpu", "lm_head": "cpu"}
        mapped, _ = load_model(folder, device_map=device_map)
    expected = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=5, progress=False)
    found = discover(mapped, tokenizer, POSITIVE, NEGATIVE, top_k=5, progress=False)
    assert torch.equal(found.neurons, expected.neurons) and torch.allclose(found.scores, expected.scores)
