"""Issue 9: no data loss, no traceback. Each case runs the real `cna` entry point (in process through
`cli.main`, or as a process where exit codes and signals matter) and checks the exit code, the message
and the file system before and after: nothing deleted, nothing half-written.

Destructive cases run only inside temporary folders (the working folder is moved there for `--out .`).
"""
from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from cna_fast import get_adapter
from cna_fast.circuit import Circuit
from cna_fast.cli import main
from cna_fast.errors import CircuitWeightsWarning, CNAError
from cna_fast.paths import check_export_folder
from cna_fast.prompts import PromptSource
from cna_fast.stats import NeuronStats
from cna_fast.steering import generate, steer
from tests.conftest import NEGATIVE, POSITIVE
from tests.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
DEAD_PID = 2 ** 22 + 12345  # above the kernel's pid_max on common systems: never a live process


def run_cli(*args, capsys=None) -> tuple[int, str]:
    """main() in process; returns the exit code and stderr (argparse usage errors included)."""
    try:
        code = main([str(arg) for arg in args])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err if capsys is not None else ""


def one_error(err: str, command: str) -> str:
    """The single `cna COMMAND:` line of stderr (progress bars aside); fails unless there is exactly one."""
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("cna ")]
    assert len(lines) == 1 and lines[0].startswith(f"cna {command}: "), err
    assert "Traceback" not in err
    return lines[0]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` with its bytes (None for folders): the file system to compare."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def _interruptible() -> None:
    """In the child: Ctrl-C as at a terminal. A suite started in the background (`pytest &` in a script) inherits
    SIGINT ignored, and Python then installs no KeyboardInterrupt handler: the child would run to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cna_process(*args, cwd: Path | None = None, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    return subprocess.Popen([sys.executable, "-m", "cna_fast", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_interruptible, **kwargs)


@pytest.fixture(scope="module")
def work(tmp_path_factory, model_dir) -> dict[str, Path]:
    """Prompt files and a 6-neuron circuit discovered once on the tiny model."""
    folder = tmp_path_factory.mktemp("bad-input")
    positive, negative = folder / "pos.txt", folder / "neg.txt"
    positive.write_text("\n".join(POSITIVE) + "\n")
    negative.write_text("\n".join(NEGATIVE) + "\n")
    circuit = folder / "circuit.safetensors"
    assert main(["discover", "--positive", str(positive), "--negative", str(negative), "--model", str(model_dir),
                 "--out", str(circuit), "--top-k", "6", "--quiet"]) == 0
    return {"folder": folder, "pos": positive, "neg": negative, "circuit": circuit, "model": Path(model_dir)}


@pytest.fixture
def scratch(tmp_path, work) -> Path:
    """A temporary folder holding copies of the prompt files and the circuit."""
    for name in ("pos", "neg", "circuit"):
        shutil.copy(work[name], tmp_path / work[name].name)
    return tmp_path


def discover_args(scratch: Path, model: Path, *extra) -> list:
    return ["discover", "--positive", scratch / "pos.txt", "--negative", scratch / "neg.txt", "--model", model,
            "--top-k", "4", "--quiet", *extra]


# 1. Export folder safety -------------------------------------------------------------------------

@pytest.mark.parametrize("where", [".", "..", "~", "model", "circuit", "circuit-folder", ""])
def test_export_never_replaces_a_folder_it_does_not_own(work, scratch, monkeypatch, capsys, where):
    home, inner = scratch / "home", scratch / "project" / "inner"
    inner.mkdir(parents=True)
    home.mkdir()
    (home / "notes.txt").write_text("keep")
    (inner / "work.txt").write_text("keep")
    model = scratch / "model"
    shutil.copytree(work["model"], model)  # a copied tiny model folder may be destroyed safely
    monkeypatch.chdir(inner)
    monkeypatch.setenv("HOME", str(home))
    out = {".": ".", "..": "..", "~": "~", "model": model, "circuit": scratch / "circuit.safetensors",
           "circuit-folder": scratch, "": ""}[where]
    before = tree(scratch)
    code, err = run_cli("export", "--circuit", scratch / "circuit.safetensors", "--model", model, "--multiplier",
                        "0", "--format", "lora", "--out", out, "--force", capsys=capsys)
    assert code == 2
    line = one_error(err, "export")
    assert "refusing" in line or "empty" in line or "not a cna_fast" in line
    assert tree(scratch) == before


def test_export_refuses_root_and_its_own_input_without_deleting(tmp_path, monkeypatch):
    """`/` is refused by the check itself (no export is attempted at /, even in a test)."""
    monkeypatch.chdir(tmp_path)
    for folder in ("/", Path.home(), tmp_path, tmp_path.parent):
        with pytest.raises(CNAError, match="refusing"):
            check_export_folder(folder, force=True)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    with pytest.raises(CNAError, match="refusing"):
        check_export_folder(tmp_path / "model", force=True, inputs=[tmp_path / "model" / "config.json"])


def test_force_replaces_only_a_previous_export(work, scratch, capsys):
    out = scratch / "export"
    args = ("export", "--circuit", scratch / "circuit.safetensors", "--model", work["model"], "--multiplier", "0",
            "--format", "lora", "--out", out)
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    before = tree(scratch)
    code, err = run_cli(*args, "--force", capsys=capsys)
    assert code == 2 and "not a cna_fast export" in err
    assert tree(scratch) == before
    (out / "thesis.tex").unlink()
    assert run_cli(*args, capsys=capsys)[0] == 0  # an empty folder is fine
    first = tree(out)
    assert "cna_fast_steering.json" in first
    code, err = run_cli(*args, capsys=capsys)
    assert code == 2 and "not empty" in err and tree(out) == first
    assert run_cli(*args[:-4], "--multiplier", "2", "--format", "lora", "--out", out, "--force", capsys=capsys)[0] == 0
    assert json.loads((out / "cna_fast_steering.json").read_text())["multiplier"] == 2
    assert sorted(p.name for p in scratch.iterdir()) == ["circuit.safetensors", "export", "neg.txt", "pos.txt"]


def test_export_cleans_leftovers_and_uses_the_umask(work, scratch, capsys):
    out = scratch / "export"
    stale = scratch / f".export.{DEAD_PID}.abcd1234.staging"  # a staging folder of a killed run
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "adapter_model.safetensors").write_bytes(b"half")
    alive = scratch / f".export.{os.getppid()}.abcd1234.staging"  # a live process's: not ours to remove
    alive.mkdir()
    unrelated = scratch / ".export.notes"
    unrelated.write_text("mine")
    previous = os.umask(0o022)
    try:
        code, _ = run_cli("export", "--circuit", scratch / "circuit.safetensors", "--model", work["model"],
                          "--multiplier", "0", "--format", "folded", "--out", out, capsys=capsys)
    finally:
        os.umask(previous)
    assert code == 0
    assert not stale.exists() and alive.is_dir() and unrelated.read_text() == "mine"
    assert out.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in out.iterdir()} == {0o644}


# 2. Outputs never overwrite inputs or each other; checked before any work --------------------------

@pytest.mark.parametrize("extra, message", [
    (["--out", "pos.txt"], "is the input --positive"),
    (["--out", "c.safetensors", "--json", "neg.txt"], "is the input --negative"),
    (["--out", "c.safetensors", "--csv", "c.safetensors"], "name the same file"),
    (["--out", "c.safetensors", "--checkpoint", "pos.txt", "--checkpoint-every", "2"], "is the input --positive"),
    (["--out", "link.safetensors"], "is the input --positive"),
    (["--out", "model/config.json"], "inside the --model folder"),
    (["--out", ""], "is empty"),
    (["--out", "missing/c.safetensors"], "does not exist"),
    (["--out", "folder"], "is a folder"),
])
def test_outputs_are_checked_before_any_work(work, scratch, monkeypatch, capsys, extra, message):
    model = scratch / "model"
    shutil.copytree(work["model"], model)
    (scratch / "folder").mkdir()
    (scratch / "link.safetensors").symlink_to(scratch / "pos.txt")
    monkeypatch.chdir(scratch)
    before = tree(scratch)
    code, err = run_cli(*discover_args(scratch, model, *extra), capsys=capsys)
    assert code == 2 and message in one_error(err, "discover")
    assert "Loading weights" not in err  # refused before the model loads
    assert tree(scratch) == before


def test_sweep_and_inspect_outputs_are_not_inputs(work, scratch, capsys):
    before = tree(scratch)
    code, err = run_cli("sweep", "--circuit", scratch / "circuit.safetensors", "--model", work["model"], "--prompts",
                        scratch / "pos.txt", "--out", scratch / "pos.txt", capsys=capsys)
    assert code == 2 and "is the input --prompts" in err
    code, err = run_cli("inspect", scratch / "circuit.safetensors", "--plot", scratch / "circuit.safetensors",
                        capsys=capsys)
    assert code == 2 and "is the input circuit" in err
    assert tree(scratch) == before


def _unshare_available() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
                           capture_output=True, check=False)
    return probe.returncode == 0


_FAULTS = """
import sys
from cna_fast.cli import main
pos, neg, model, ro, full, ok = sys.argv[1:7]
base = ["discover", "--positive", pos, "--negative", neg, "--model", model, "--quiet"]
print("RO", main(base + ["--top-k", "4", "--out", ok + "/c.safetensors", "--json", ro + "/c.json"]), flush=True)
print("FULL", main(base + ["--top-k", "300", "--out", full + "/c.safetensors", "--json", full + "/c.json"]), flush=True)
"""


@pytest.mark.skipif(not _unshare_available(), reason="needs unshare and tmpfs mounts (Linux user namespaces)")
def test_read_only_and_full_disk_exit_2_with_no_partial_output(work, scratch):
    """Real faults in a private mount namespace: a read-only folder (refused before the compute) and a
    disk too small for the circuit (ENOSPC while writing): exit 2, one line each, no file left."""
    ro, full, ok = scratch / "ro", scratch / "full", scratch / "ok"
    for folder in (ro, full, ok):
        folder.mkdir()
    script = (f"mount -t tmpfs -o ro,size=8k tmpfs {ro} && mount -t tmpfs -o size=8k tmpfs {full} && "
              f"{sys.executable} -c '{_FAULTS}' {scratch / 'pos.txt'} {scratch / 'neg.txt'} {work['model']} "
              f"{ro} {full} {ok} && ls -A {full} {ro}")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=env,
                            timeout=300, check=False)
    assert "RO 2" in result.stdout and "FULL 2" in result.stdout, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("cna discover:")]
    assert len(errors) == 2 and "read-only" in errors[0] and "no space left" in errors[1]
    assert "Traceback" not in result.stderr
    assert result.stdout.strip().endswith(("FULL 2", f"{ro}:")) and "c.json" not in result.stdout
    assert sorted(p.name for p in ok.iterdir()) == []  # the circuit was not written when --json could not be


# 3. Circuit and checkpoint files are validated; numbers are bounded before allocation ----------------

def _tensors_and_meta(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}, dict(handle.metadata())  # noqa: SIM118


def _craft(source: Path, target: Path, case: str) -> None:
    tensors, header = _tensors_and_meta(source)
    meta = json.loads(header["meta"])
    if case == "meta-not-json":
        header["meta"] = "{not json"
    elif case == "meta-a-list":
        header["meta"] = "[1, 2]"
    elif case == "huge-layer-count":
        meta["architecture"]["num_layers"] = 3_000_000_000
    elif case == "huge-layer":
        tensors["layers"][0] = 3_000_000_000
        meta.pop("architecture")
    elif case == "extra-tensor":
        tensors["payload"] = torch.zeros(3)
    elif case == "missing-tensor":
        tensors.pop("scores")
    elif case == "2d-layers":
        tensors["layers"] = tensors["layers"].reshape(2, -1)
    elif case == "negative-layer":
        tensors["layers"][0] = -1
    elif case == "float-layers":
        tensors["layers"] = tensors["layers"].double() + 0.5
    elif case == "duplicate-neuron":
        tensors["layers"][1], tensors["neurons"][1] = tensors["layers"][0], tensors["neurons"][0]
    elif case == "nan-scores":
        tensors["scores"][:] = float("nan")
    elif case == "caa-width":
        tensors["caa_directions"] = torch.zeros(tensors["caa_directions"].shape[0], 65)
    elif case == "caa-rows":
        tensors["caa_directions"] = tensors["caa_directions"][:2]
    elif case == "architecture-type":
        meta["architecture"]["d_ff"] = "96"
    if case not in ("meta-not-json", "meta-a-list"):
        header["meta"] = json.dumps(meta)
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(target), metadata=header)


@pytest.mark.parametrize("case", ["meta-not-json", "meta-a-list", "huge-layer-count", "huge-layer", "extra-tensor",
                                  "missing-tensor", "2d-layers", "negative-layer", "float-layers", "duplicate-neuron",
                                  "nan-scores", "caa-width", "caa-rows", "architecture-type"])
def test_crafted_circuit_files_exit_2(work, scratch, capsys, case):
    crafted = scratch / "crafted.safetensors"
    _craft(work["circuit"], crafted, case)
    assert crafted.stat().st_size < 8_000
    before = tree(scratch)
    code, err = run_cli("inspect", crafted, capsys=capsys)
    assert code == 2 and str(crafted) in one_error(err, "inspect")
    assert tree(scratch) == before


def test_duplicate_neurons_are_refused_in_code_too():
    values = torch.ones(2)
    with pytest.raises(CNAError, match="more than once"):
        Circuit(layers=[1, 1], neurons=[5, 5], scores=values, deltas=values, mean_positive=values,
                mean_negative=values, std_positive=values, std_negative=values)


def test_caa_width_is_checked_against_the_model_without_a_recorded_architecture(tiny_llama):
    """An old or hand-made circuit without a recorded hidden size: the width is checked when CAA is applied."""
    from cna_fast.steering import caa

    values = torch.ones(1, dtype=torch.float64)
    circuit = Circuit(layers=[1], neurons=[2], scores=values, deltas=values, mean_positive=values,
                      mean_negative=values * 0, std_positive=values, std_negative=values,
                      caa_layers=[1], caa_directions=torch.zeros(1, 65))
    with pytest.raises(CNAError, match="65 wide"):
        caa(tiny_llama, circuit, 1.0)


def _checkpoint(path: Path, case: str) -> None:
    stats = NeuronStats([0, 1, 2, 3], 96)
    stats.count = torch.tensor([4.0, 4.0], dtype=torch.float64)
    stats.meta = {"identity": {"layers": [0, 1, 2, 3]}, "consumed": 8}
    if case == "nan":
        stats.mean[1, 0, 3] = float("nan")
    elif case == "consumed-text":
        stats.meta["consumed"] = "8"
    elif case == "consumed-negative":
        stats.meta["consumed"] = -1
    elif case == "identity-number":
        stats.meta["identity"] = 5
    elif case == "layers-mismatch":
        stats.meta["identity"]["layers"] = [0, 1]
    stats.save(path)
    if case in ("extra-tensor", "wrong-shape", "negative-count"):
        tensors, header = _tensors_and_meta(path)
        if case == "extra-tensor":
            tensors["x"] = torch.zeros(1)
        elif case == "wrong-shape":
            tensors["m2"] = tensors["m2"][:, :1].contiguous()
        else:
            tensors["count"] = torch.tensor([-4.0, 4.0], dtype=torch.float64)
        save_file(tensors, str(path), metadata=header)


@pytest.mark.parametrize("case", ["nan", "consumed-text", "consumed-negative", "identity-number", "layers-mismatch",
                                  "extra-tensor", "wrong-shape", "negative-count"])
def test_crafted_checkpoints_exit_2(work, scratch, capsys, case):
    checkpoint = scratch / "run.checkpoint"
    _checkpoint(checkpoint, case)
    before = tree(scratch)
    code, err = run_cli(*discover_args(scratch, work["model"], "--out", scratch / "c.safetensors", "--checkpoint",
                                       checkpoint, "--checkpoint-every", "2", "--resume"), capsys=capsys)
    assert code == 2 and "is damaged" in one_error(err, "discover") and "Loading" not in err  # before the model
    assert tree(scratch) == before


# 4. Multipliers must be finite in the dtype they are applied in -----------------------------------

@pytest.mark.parametrize("fmt", ["folded", "lora"])
def test_huge_multiplier_export_names_the_dtype_limit(work, scratch, capsys, fmt):
    before = tree(scratch)
    code, err = run_cli("export", "--circuit", scratch / "circuit.safetensors", "--model", work["model"],
                        "--multiplier", "1e308", "--format", fmt, "--out", scratch / "out", capsys=capsys)
    assert code == 2 and "float32" in err and "3.4" in err
    assert tree(scratch) == before


@pytest.mark.parametrize("dtype, value, limit, extra", [("float32", "1e308", "float32", []),
                                                        ("float32", "1e308", "float32", ["--compare"]),
                                                        ("float16", "1e5", "float16", [])])
def test_huge_multiplier_generate_names_the_dtype_limit(work, capsys, dtype, value, limit, extra):
    code, err = run_cli("generate", "--circuit", work["circuit"], "--model", work["model"], "--multiplier", value,
                        "--prompt", "zebra", "--dtype", dtype, "--max-new-tokens", "2", "--quiet", *extra,
                        capsys=capsys)
    assert code == 2 and f"not finite in {limit}" in err and "NaN" not in err


# 5. Degenerate contrasts --------------------------------------------------------------------------

def test_identical_prompt_sets_are_refused(work, scratch, capsys):
    shutil.copy(scratch / "pos.txt", scratch / "same.txt")
    before = tree(scratch)
    for negative in ("pos.txt", "same.txt"):
        code, err = run_cli("discover", "--positive", scratch / "pos.txt", "--negative", scratch / negative,
                            "--model", work["model"], "--out", scratch / "c.safetensors", capsys=capsys)
        assert code == 2 and "same prompts" in one_error(err, "discover") and "Loading weights" not in err
    assert tree(scratch) == before


def test_identical_contrast_is_refused_in_the_library(tiny_llama, tokenizer):
    from cna_fast import discover

    with pytest.raises(CNAError, match="same activations"):
        discover(tiny_llama, tokenizer, POSITIVE, list(reversed(POSITIVE)), top_k=3, progress=False)


# 6. Exit policy: 2 for input and environment, 130 for Ctrl-C, 1 for bugs ----------------------------

@pytest.mark.parametrize("temperature", ["0", "-1", "nan"])
def test_sampling_temperature_must_be_positive(work, capsys, temperature):
    code, err = run_cli("generate", "--circuit", work["circuit"], "--model", work["model"], "--prompt", "zebra",
                        "--sample", "--temperature", temperature, capsys=capsys)
    assert code == 2 and "--temperature" in err


@pytest.mark.parametrize("content, message", [(None, "is empty"), ("{}", "names no model_type"),
                                              ('{"model_type": "no_such_arch"}', "does not know"),
                                              ('{"model_type": "clip"}', "not a causal language model"),
                                              ("not json", "cannot read")])
def test_model_folders_empty_or_unknown_exit_2(work, tmp_path, capsys, content, message):
    folder = tmp_path / "model"
    folder.mkdir()
    if content is not None:
        (folder / "config.json").write_text(content)
    code, err = run_cli("generate", "--circuit", work["circuit"], "--model", folder, "--prompt", "zebra",
                        capsys=capsys)
    assert code == 2 and message in one_error(err, "generate")


def test_ctrl_c_exits_130_with_one_line_and_no_partial_file(work, tmp_path):
    many = tmp_path / "many.txt"
    many.write_text("".join(f"zebra number {i}\n" for i in range(5000)))
    out = tmp_path / "c.safetensors"
    process = cna_process("discover", "--positive", many, "--negative", work["neg"], "--model", work["model"],
                          "--out", out, "--json", tmp_path / "c.json", "--batch-size", "4")
    # Wait for conditions, not for a time budget: a loaded machine only makes each step slower. The
    # interrupt goes out once the progress bar shows capture under way; the exit is awaited however long
    # it takes (the hang guard is far above any real run: a hang, not slowness, is what it catches).
    seen = b""
    os.set_blocking(process.stderr.fileno(), False)
    while b"prompt" not in seen and process.poll() is None:
        seen += process.stderr.read() or b""
        time.sleep(0.1)
    assert process.poll() is None, seen
    process.send_signal(signal.SIGINT)
    os.set_blocking(process.stderr.fileno(), True)
    err = process.communicate(timeout=1800)[1].decode()
    assert process.returncode == 130
    assert one_error(err, "discover") == "cna discover: interrupted; no partial output was written"
    assert err.rstrip().splitlines()[-1] == "cna discover: interrupted; no partial output was written"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.txt"]


def test_an_output_set_is_written_all_or_none(tmp_path):
    """A failure while writing the last of several outputs (cna eval's CSV, JSON, plot and HTML) leaves the
    earlier ones unwritten and the files already there untouched, with no temporary left behind."""
    from cna_fast._io import atomic_outputs

    first, last = tmp_path / "eval.csv", tmp_path / "eval.html"
    last.write_text("the previous report")
    with pytest.raises(OSError, match="disk full"):
        with atomic_outputs([first, None, last]) as temporary:
            temporary[str(first)].write_text("new rows")
            raise OSError("disk full")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.html"]
    assert last.read_text() == "the previous report"
    with atomic_outputs([first, last]) as temporary:
        for path in (first, last):
            temporary[str(path)].write_text(f"new {path.suffix}")
    assert (first.read_text(), last.read_text()) == ("new .csv", "new .html")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval.csv", "eval.html"]


def test_a_bug_exits_1_with_a_hint_to_report_it(work, monkeypatch, capsys):
    """Any exception that is not about the input or the environment is a bug: exit 1, one line, a hint."""
    from cna_fast.cli import commands

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(commands, "run_inspect", broken)
    code, err = run_cli("inspect", work["circuit"], capsys=capsys)
    line = one_error(err, "inspect")
    assert code == 1 and "ZeroDivisionError" in line and "report" in line and err.count("\n") == 1


# 7. Prompt files; leftovers of killed runs ----------------------------------------------------------

@pytest.mark.parametrize("suffix, body", [(".txt", "zebra\nfox\n"),
                                          (".jsonl", '{"prompt": "zebra"}\n{"text": "fox"}\n'),
                                          (".csv", "prompt\nzebra\nfox\n")])
def test_utf8_bom_is_stripped(tmp_path, suffix, body):
    path = tmp_path / f"prompts{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert list(PromptSource(path)) == ["zebra", "fox"]


def test_prompt_file_problems_name_what_they_are(work, scratch, capsys):
    (scratch / "open.csv").write_text('prompt\n"zebra stripes\nfox\n')
    os.mkfifo(scratch / "pipe.txt")
    (scratch / "zero.txt").symlink_to("/dev/zero")
    (scratch / "dir.txt").mkdir()
    before = tree(scratch)
    for name, message in (("open.csv", "malformed CSV"), ("pipe.txt", "is a named pipe (FIFO)"),
                          ("zero.txt", "is a character device"), ("dir.txt", "is a folder")):
        code, err = run_cli("discover", "--positive", scratch / name, "--negative", scratch / "neg.txt", "--model",
                            work["model"], "--out", scratch / "c.safetensors", capsys=capsys)
        assert code == 2 and message in err, err
    assert tree(scratch) == before


def test_leftover_temporary_files_are_removed_on_the_next_run(work, scratch, capsys):
    stale = scratch / f".c.safetensors.{DEAD_PID}.k2j4h5g6.tmp"
    stale.write_bytes(b"half a circuit")
    live = scratch / f".c.safetensors.{os.getppid()}.k2j4h5g6.tmp"
    live.write_bytes(b"another run is writing this")
    code, _ = run_cli(*discover_args(scratch, work["model"], "--out", scratch / "c.safetensors"), capsys=capsys)
    assert code == 0 and not stale.exists() and live.exists()
    assert sorted(p.name for p in scratch.iterdir()) == sorted(["c.safetensors", "circuit.safetensors", "neg.txt",
                                                                "pos.txt", live.name])


# 8. Text from files is displayed safely -------------------------------------------------------------

def test_inspect_escapes_terminal_sequences_and_plots_dollar_names(work, scratch, capsys):
    tensors, header = _tensors_and_meta(work["circuit"])
    meta = json.loads(header["meta"])
    meta["model"] = "evil\x1b]0;pwned\x07\x1b[2J $x^2$ cost $5"
    header["meta"] = json.dumps(meta)
    crafted = scratch / "named.safetensors"
    save_file(tensors, str(crafted), metadata=header)
    code = main(["inspect", str(crafted), "--plot", str(scratch / "plot.png")])
    out = capsys.readouterr().out
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "evil\\x1b]0;pwned\\x07\\x1b[2J $x^2$ cost $5" in out
    assert (scratch / "plot.png").read_bytes()[:4] == b"\x89PNG"


# 9. Python API types --------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kwargs, message", [
    ("a string", {}, "single string"), ([None], {}, "prompts\\[0\\] is NoneType"), ([b"bytes"], {}, "bytes"),
    (["zebra"], {"max_new_tokens": 0}, "max_new_tokens"), (["zebra"], {"max_new_tokens": 2.5}, "max_new_tokens"),
])
def test_generate_validates_its_inputs(tiny_llama, tokenizer, prompts, kwargs, message):
    with pytest.raises(CNAError, match=message):
        generate(tiny_llama, tokenizer, prompts, progress=False, **kwargs)


# 10. Content: the weight sample ----------------------------------------------------------------------------

def _circuit_for(model) -> Circuit:
    values = torch.tensor([1.0, 0.5], dtype=torch.float64)
    return Circuit(layers=[1, 2], neurons=[3, 4], scores=values, deltas=values, mean_positive=values,
                   mean_negative=values * 0, std_positive=values, std_negative=values,
                   meta={"model": "tiny-a", "architecture": get_adapter(model).architecture()})


def test_same_shape_other_weights_warn(tokenizer):
    original = build_tiny_model("llama", len(tokenizer), seed=0)
    circuit = _circuit_for(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CircuitWeightsWarning)
        for same in (original, build_tiny_model("llama", len(tokenizer), seed=0, dtype=torch.bfloat16),
                     build_tiny_model("llama", len(tokenizer), seed=0, dtype=torch.float16)):
            with steer(same, circuit, 0.0):
                pass
    fine_tuned = build_tiny_model("llama", len(tokenizer), seed=0)
    with torch.no_grad():
        fine_tuned.model.layers[0].mlp.down_proj.weight.mul_(1.01)
    for other in (build_tiny_model("llama", len(tokenizer), seed=1), fine_tuned):
        with pytest.warns(CircuitWeightsWarning, match="weights differ"), steer(other, circuit, 0.0):
            pass


def test_cli_warns_when_the_model_has_other_weights(work, tmp_path, tokenizer, capsys):
    other = tmp_path / "other"
    build_tiny_model("llama", len(tokenizer), seed=7).save_pretrained(other)
    tokenizer.save_pretrained(other)
    code, err = run_cli("generate", "--circuit", work["circuit"], "--model", other, "--prompt", "zebra",
                        "--max-new-tokens", "2", "--quiet", capsys=capsys)
    assert code == 0 and "cna: warning:" in err and "weights differ" in err
    assert math.isfinite(float(Circuit.load(work["circuit"]).scores[0]))
