"""Discovery on mixture-of-experts models end to end: checkpoint/resume, torchrun ranks, the CLI."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from cna_fast import Checkpoint, discover, load_model
from cna_fast.circuit import Circuit
from cna_fast.stats import MoEStats
from tests.conftest import NEGATIVE, POSITIVE
from tests.test_distributed import _free_port
from tests.test_streaming import varied_prompts
from tests.tiny import build_tokenizer
from tests.tiny_moe import build_tiny_moe


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """A tiny Qwen2-MoE (dense first layer, shared and routed experts) saved as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny-qwen2-moe")
    tokenizer = build_tokenizer()
    build_tiny_moe("qwen2_moe", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def same_circuit(first: Circuit, second: Circuit, rtol: float = 0.0) -> None:
    for name in ("layers", "experts", "neurons"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name
    torch.testing.assert_close(first.scores, second.scores, rtol=rtol, atol=0)


def test_resume_after_crash_gives_the_uninterrupted_moe_circuit(tokenizer, tmp_path):
    from cna_fast.capture import capture_contrast
    from cna_fast.pipeline import run_identity
    from cna_fast.settings import CaptureSettings

    model = build_tiny_moe("deepseek_v3", len(tokenizer))
    positive, negative = varied_prompts(40, 1, "zebra "), varied_prompts(40, 2)
    settings = dict(top_k=6, batch_size=1, reduction="all", moe_mode="conditional", progress=False)  # windows of 32
    expected = discover(model, tokenizer, positive, negative, **settings)
    checkpoint = tmp_path / "run.checkpoint"

    def crashing(prompts, after):
        for index, prompt in enumerate(prompts):
            if index == after:
                raise KeyboardInterrupt
            yield prompt

    capture = CaptureSettings(batch_size=1, reduction="all", moe_mode="conditional")
    identity = run_identity(model, tokenizer, positive, negative, CaptureSettings.build(capture, layers=range(4)))
    with pytest.raises(KeyboardInterrupt):
        capture_contrast(model, tokenizer, positive, crashing(negative, 30), capture, progress=False,
                         checkpoint=Checkpoint(checkpoint, 32, identity))
    assert 0 < MoEStats.load(checkpoint).meta["consumed"] < 80
    resumed = discover(model, tokenizer, positive, negative, checkpoint=Checkpoint(checkpoint, 32, resume=True),
                       **settings)
    same_circuit(resumed, expected)
    assert MoEStats.load(checkpoint).meta["consumed"] == 80


def test_torchrun_two_ranks_equal_one_process_on_moe(moe_dir, prompt_files, tmp_path):
    out = tmp_path / "distributed.safetensors"
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               f"--master_port={_free_port()}", "-m", "cna_fast", "discover", "--distributed",
               "--positive", str(prompt_files[0]), "--negative", str(prompt_files[1]), "--model", str(moe_dir),
               "--out", str(out), "--top-k", "8", "--score", "t", "--moe-mode", "conditional", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = Circuit.load(out)
    model, tokenizer = load_model(moe_dir)
    single = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=8, score="t", moe_mode="conditional",
                      progress=False)
    same_circuit(distributed, single, rtol=1e-5)
    assert distributed.routed.any() and distributed.meta["moe_mode"] == "conditional"
    assert distributed.meta["routing"] == single.meta["routing"]


def test_cli_discover_and_inspect_on_moe(moe_dir, prompt_files, tmp_path, capsys):
    from cna_fast.cli import main

    out = tmp_path / "circuit.safetensors"
    code = main(["discover", "--positive", str(prompt_files[0]), "--negative", str(prompt_files[1]), "--model",
                 str(moe_dir), "--out", str(out), "--csv", str(tmp_path / "c.csv"), "--top-k", "5", "--reduction",
                 "mean", "--quiet"])
    assert code in (0, None)
    capsys.readouterr()
    main(["inspect", str(out)])
    report = capsys.readouterr().out
    assert "expert" in report and "routing frequency per prompt" in report
    assert (tmp_path / "c.csv").read_text().splitlines()[0].startswith("rank,layer,expert,neuron")


def test_universal_filter_on_moe_is_a_clear_error(tokenizer):
    from cna_fast.errors import CNAError

    model = build_tiny_moe("olmoe", len(tokenizer))
    with pytest.raises(CNAError, match="universal-neuron filter"):
        discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=3, universal_filter=True, progress=False)
