"""The `cna` command: outputs, and exit code 2 with nothing written for every kind of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cna_fast.circuit import Circuit
from cna_fast.cli import main
from tests.tiny import build_tiny_model, build_tokenizer

from tests.conftest import NEGATIVE, POSITIVE


def run_cli(*args: str) -> int:
    """main() with SystemExit (argparse's usage errors) turned into its exit code."""
    try:
        return main([str(arg) for arg in args])
    except SystemExit as exit_:
        return exit_.code


def discover_args(model_dir: Path, positive: Path, negative: Path, out: Path, *extra: str) -> list[str]:
    return ["discover", "--positive", positive, "--negative", negative, "--model", model_dir, "--out", out,
            "--quiet", *extra]


def test_discover_writes_circuit_json_and_csv(model_dir, prompt_files, tmp_path, capsys):
    out, as_json, as_csv = tmp_path / "c.safetensors", tmp_path / "c.json", tmp_path / "c.csv"
    code = run_cli(*discover_args(model_dir, *prompt_files, out, "--top-k", "7", "--exclude-layers", "0,1",
                                  "--json", as_json, "--csv", as_csv))
    assert code == 0
    circuit = Circuit.load(out)
    assert len(circuit) == 7 and set(circuit.layers.tolist()) <= {2, 3}
    assert circuit.meta["n_positive"] == 4 and circuit.meta["exclude_layers"] == [0, 1]
    assert [n["neuron"] for n in json.loads(as_json.read_text())["neurons"]] == circuit.neurons.tolist()
    assert len(as_csv.read_text().splitlines()) == 8
    assert "neurons per layer" in capsys.readouterr().out


@pytest.mark.parametrize("suffix, body", [
    (".jsonl", '{"prompt": "%s"}\n'),
    (".jsonl", '{"text": "%s"}\n'),
    (".csv", None),
])
def test_discover_reads_jsonl_and_csv(model_dir, tmp_path, suffix, body):
    files = []
    for name, prompts in (("pos", POSITIVE), ("neg", NEGATIVE)):
        path = tmp_path / f"{name}{suffix}"
        if body is None:
            path.write_text("id,prompt\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(prompts)))
        else:
            path.write_text("".join(body % p for p in prompts))
        files.append(path)
    out = tmp_path / "c.safetensors"
    assert run_cli(*discover_args(model_dir, *files, out, "--top-k", "3")) == 0
    assert Circuit.load(out).meta["n_negative"] == 4


def test_same_circuit_from_cli_and_python(model_dir, prompt_files, tmp_path):
    from cna_fast import discover, load_model

    out = tmp_path / "c.safetensors"
    assert run_cli(*discover_args(model_dir, *prompt_files, out, "--top-k", "5", "--score", "t")) == 0
    model, tokenizer = load_model(model_dir)
    expected = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=5, score="t", progress=False)
    circuit = Circuit.load(out)
    assert torch.equal(circuit.layers, expected.layers) and torch.equal(circuit.neurons, expected.neurons)


def test_inspect_prints_summary_and_plots(model_dir, prompt_files, tmp_path, capsys):
    out, plot = tmp_path / "c.safetensors", tmp_path / "c.png"
    assert run_cli(*discover_args(model_dir, *prompt_files, out, "--top-k", "6")) == 0
    capsys.readouterr()
    assert run_cli("inspect", out, "--plot", plot) == 0
    text = capsys.readouterr().out
    assert "circuit: 6 neurons" in text and "top 6 neurons" in text
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_prompt_file(tmp_path: Path, kind: str) -> Path:
    if kind == "empty":
        path = tmp_path / "empty.txt"
        path.write_text("\n\n")
    elif kind == "missing":
        path = tmp_path / "missing.txt"
    elif kind == "undecodable":
        path = tmp_path / "binary.txt"
        path.write_bytes(b"\xff\xfe\xfa\x00bad")
    elif kind == "folder":
        path = tmp_path / "folder.txt"
        path.mkdir()
    elif kind == "bad-json":
        path = tmp_path / "bad.jsonl"
        path.write_text('{"prompt": "fine"}\n{not json}\n')
    elif kind == "no-field":
        path = tmp_path / "nofield.jsonl"
        path.write_text('{"question": "where is the prompt"}\n')
    elif kind == "no-column":
        path = tmp_path / "nocolumn.csv"
        path.write_text("question\nwhere\n")
    else:
        path = tmp_path / "prompts.pdf"
        path.write_text("zebra")
    return path


@pytest.mark.parametrize("kind", ["empty", "missing", "undecodable", "folder", "bad-json", "no-field", "no-column",
                                  "extension"])
def test_bad_prompt_file_exits_2_and_writes_nothing(model_dir, prompt_files, tmp_path, capsys, kind):
    bad = _bad_prompt_file(tmp_path, kind)
    out = tmp_path / "out.safetensors"
    assert run_cli(*discover_args(model_dir, bad, prompt_files[1], out)) == 2
    assert not out.exists()
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--top-k", "0"], "argument --top-k: must be at least 1"),
    (["--top-k", "100000"], "more than the"),
    (["--top-frac", "0"], "argument --top-frac: must be in (0, 1]"),
    (["--exclude-layers", "99"], "out of range"),
    (["--exclude-layers", "0,1,2,3"], "every layer is excluded"),
    (["--exclude-layers", "one"], "comma-separated layer numbers"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
])
def test_bad_option_exits_2_and_writes_nothing(model_dir, prompt_files, tmp_path, capsys, extra, message):
    out = tmp_path / "out.safetensors"
    assert run_cli(*discover_args(model_dir, *prompt_files, out, *extra)) == 2
    assert not out.exists()
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("option, value", [("--reduction", "first"), ("--score", "zscore")])
def test_unknown_reduction_or_score_exits_2(model_dir, prompt_files, tmp_path, capsys, option, value):
    out = tmp_path / "out.safetensors"
    assert run_cli(*discover_args(model_dir, *prompt_files, out, option, value)) == 2
    assert not out.exists()
    assert "invalid choice" in capsys.readouterr().err


def test_missing_model_path_exits_2(prompt_files, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert run_cli(*discover_args(tmp_path / "no-such-model", *prompt_files, out)) == 2
    assert not out.exists()
    assert "does not exist" in capsys.readouterr().err


def test_output_folder_missing_exits_2_before_any_work(model_dir, prompt_files, tmp_path, capsys):
    out = tmp_path / "no-such-folder" / "c.safetensors"
    assert run_cli(*discover_args(model_dir, *prompt_files, out)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_inspect_bad_circuit_file_exits_2(tmp_path, capsys):
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(b"not a circuit")
    assert run_cli("inspect", bogus) == 2
    assert run_cli("inspect", tmp_path / "missing.safetensors") == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_exit_code(prompt_files, tmp_path):
    """The installed entry point (python -m cna_fast) returns 2 on bad input, through a real process."""
    result = subprocess.run([sys.executable, "-m", "cna_fast", "discover", "--positive", str(prompt_files[0]),
                             "--negative", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "c.safetensors")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "missing.txt" in result.stderr and "does not exist" in result.stderr
    assert not (tmp_path / "c.safetensors").exists()


@pytest.fixture
def circuit_file(model_dir, prompt_files, tmp_path) -> Path:
    out = tmp_path / "circuit.safetensors"
    assert run_cli(*discover_args(model_dir, *prompt_files, out, "--top-k", "6")) == 0
    return out


def test_generate_compare_prints_baseline_and_steered(model_dir, circuit_file, capsys):
    code = run_cli("generate", "--circuit", circuit_file, "--model", model_dir, "--multiplier", "0",
                   "--prompt", "zebra stripes", "--compare", "--max-new-tokens", "5", "--quiet")
    assert code == 0
    text = capsys.readouterr().out
    assert ">>> zebra stripes" in text and "baseline" in text and "steered (x0)" in text


def test_sweep_writes_csv_and_plot(model_dir, circuit_file, prompt_files, tmp_path, capsys):
    out, plot = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    code = run_cli("sweep", "--circuit", circuit_file, "--model", model_dir, "--multipliers", "0,1,2",
                   "--prompts", prompt_files[0], "--max-new-tokens", "4", "--out", out, "--plot", plot, "--quiet")
    assert code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == "multiplier,prompt_index,prompt,output,behavior,quality,answer_ppl"
    assert len(lines) == 1 + 3 * len(POSITIVE)
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "=== multiplier 2" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["folded", "lora"])
def test_export_writes_folder_and_refuses_non_empty(model_dir, circuit_file, tmp_path, capsys, fmt):
    out = tmp_path / f"export-{fmt}"
    args = ("export", "--circuit", circuit_file, "--model", model_dir, "--multiplier", "0", "--format", fmt,
            "--out", out)
    assert run_cli(*args) == 0
    expected = "adapter_config.json" if fmt == "lora" else "config.json"
    assert (out / expected).is_file()
    before = sorted(path.name for path in out.iterdir())
    assert run_cli(*args) == 2
    assert "not empty" in capsys.readouterr().err
    assert sorted(path.name for path in out.iterdir()) == before
    assert run_cli(*args, "--force") == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "zero"])
def test_non_finite_multiplier_exits_2(model_dir, circuit_file, capsys, value):
    code = run_cli("generate", "--circuit", circuit_file, "--model", model_dir, "--multiplier", value,
                   "--prompt", "zebra")
    assert code == 2
    assert "--multiplier" in capsys.readouterr().err


@pytest.mark.parametrize("model_type", ["gpt_neox", "gpt2"])
def test_circuit_that_does_not_fit_the_model_exits_2(circuit_file, tmp_path, capsys, model_type):
    """A circuit from the 4-layer x 96 tiny Llama, applied to another architecture (GPT-NeoX has the same
    shape, GPT-2 a different width)."""
    folder = tmp_path / f"tiny-{model_type}"
    tokenizer = build_tokenizer()
    other = build_tiny_model(model_type, len(tokenizer))
    if model_type == "gpt2":
        other = type(other)(type(other.config)(**{**other.config.to_dict(), "n_inner": 128}))
    other.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    capsys.readouterr()
    for command in (["generate", "--prompt", "zebra"], ["export", "--format", "lora", "--out", tmp_path / "x"]):
        code = run_cli(*command, "--circuit", circuit_file, "--model", folder, "--multiplier", "0")
        assert code == 2
        assert "discover a circuit on this model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
