"""The CLI's exit policy and its before-any-work checks of the paths a command reads and writes.

Exit codes: 0 done; 2 bad input or environment (a CNAError, a full or read-only disk, a missing
file, too little memory), with one line naming the problem and the fix; 130 interrupted (Ctrl-C),
with no partial file; 1 anything else, which is a bug, with a hint to report it.
"""
from __future__ import annotations

import errno
import os
import re

from ..errors import CNAError
from ..models import default_gguf_path
from ..paths import check_distinct_inputs, check_model_folder, check_outputs
from ..stats import load_stats

EXIT_BUG = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

_OS_FIXES = {
    errno.ENOSPC: "no space left on the device: free some space or write to another disk",
    errno.EDQUOT: "disk quota exceeded: free some space or write to another disk",
    errno.EROFS: "the file system is read-only: write to a folder on a writable disk",
    errno.EACCES: "permission denied: choose a path you may read or write, or fix its permissions",
    errno.EPERM: "operation not permitted: choose a path you may read or write, or fix its permissions",
    errno.ENOENT: "no such file or folder: check the path",
    errno.EISDIR: "is a folder: give a file",
    errno.ENOTDIR: "a part of the path is not a folder: check the path",
    errno.EFBIG: "file too large for this system (see `ulimit -f`): write to another disk or raise the limit",
    errno.EMFILE: "too many open files: raise the limit (`ulimit -n`)",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_os_error(error: OSError) -> str:
    """One line: the path involved, what went wrong, and what to do."""
    where = f"{error.filename}: " if getattr(error, "filename", None) else ""
    fix = _OS_FIXES.get(error.errno)
    if fix is None:
        fix = f"{error.strerror or error}: check the disk and the paths given"
    return f"{where}{fix}"


def _os_error_inside(error: BaseException) -> OSError | None:
    """The OSError behind an exception: itself, or one that a Rust-based library (safetensors, tokenizers)
    reported only in its message as "(os error N)"."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error))
    return OSError(int(found.group(1)), os.strerror(int(found.group(1)))) if found else None


def classify_failure(error: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for an exception that ended a command."""
    if isinstance(error, CNAError):
        return EXIT_BAD_INPUT, f"error: {_one_line(error)}"
    system = _os_error_inside(error)
    if system is not None:
        return EXIT_BAD_INPUT, f"error: {_one_line(describe_os_error(system))}"
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return EXIT_BAD_INPUT, ("error: out of memory: lower --batch-size, use a smaller model or a smaller dtype "
                                f"({_one_line(error)[:200]})")
    return EXIT_BUG, (f"internal error: {type(error).__name__}: {_one_line(error)[:500]} -- this is a bug in "
                      "cna_fast; please report it with the command line (CNA_FAST_DEBUG=1 shows the traceback)")


def _model_input(args) -> str | None:
    """The model folder a command reads: --model, or the embedded default's converted folder."""
    model = getattr(args, "model", None)
    if model is not None:
        return model
    try:
        return str(default_gguf_path())  # the embedded default's GGUF file (converted into the cache on use)
    except CNAError:
        return None  # not installed: load_model reports it


def _checkpoint(args) -> str | None:
    if getattr(args, "checkpoint_every", None) is None and not getattr(args, "resume", False):
        return None
    return args.checkpoint or f"{args.out}.checkpoint"


# Per command: its output options and its input options (argparse destinations, shown as flags).
_OUTPUTS = {"discover": ("out", "json", "csv", "save_stats"), "tune": ("out", "csv", "json", "plot"),
            "generate": ("out",), "inspect": ("plot",), "sweep": ("out", "plot"),
            "eval": ("csv", "json", "plot", "html"), "demo": ("out", "plot", "csv")}
_INPUTS = {"discover": ("positive", "negative"), "inspect": ("circuit",), "generate": ("circuit", "prompts"),
           "sweep": ("circuit", "prompts"), "export": ("circuit",),
           "eval": ("circuit", "prompts", "judge_labels", "positive", "negative"),
           "tune": ("positive", "negative", "stats", "eval_prompts", "neutral")}


def check_command_paths(args) -> None:
    """Before any work: outputs distinct from each other and from the inputs, writable; model folder sane."""
    outputs = {f"--{name}": getattr(args, name, None) for name in _OUTPUTS.get(args.command, ())}
    if args.command == "discover":
        outputs["--checkpoint"] = _checkpoint(args)
    if args.command == "export" and args.format == "gguf":
        outputs["--out"] = args.out  # a file, checked like every other output
    if args.command == "generate" and args.out:
        from ..jobs import sidecar_path

        outputs["--out's job settings file"] = str(sidecar_path(args.out))  # written beside it: held to the same rules
    inputs = {(f"--{name}" if name != "circuit" or args.command != "inspect" else "circuit"): getattr(args, name)
              for name in _INPUTS.get(args.command, ()) if getattr(args, name, None)}
    if isinstance(inputs.get("--circuit"), list):  # cna generate: --circuit [NAME=]PATH, repeated
        for name, path in named_circuit_paths(inputs.pop("--circuit")).items():
            inputs[f"--circuit {name}"] = path
    if args.command != "inspect":
        inputs["--model"] = _model_input(args)
        check_model_folder(getattr(args, "model", None))
    if getattr(args, "judge", None):
        inputs["--judge"] = args.judge
        check_model_folder(args.judge, "--judge")
    check_outputs(outputs, inputs)
    if args.command == "discover":
        check_distinct_inputs(("--positive", args.positive), ("--negative", args.negative))
        checkpoint = outputs["--checkpoint"]
        if getattr(args, "resume", False) and checkpoint and os.path.isfile(checkpoint):
            load_stats(checkpoint)  # a damaged checkpoint fails now, not after the model loads
    if args.command == "export" and not str(args.out).strip():
        raise CNAError("--out is empty: give a new folder such as --out steered-model")


def named_circuit_paths(specs: list[str]) -> dict[str, str]:
    """--circuit values as {name: path}: NAME=PATH, or a plain PATH named by its file stem."""
    named: dict[str, str] = {}
    for spec in specs:
        name, separator, path = spec.partition("=")
        if not separator or not name or os.path.exists(spec) or "/" in name or os.sep in name:
            name, path = os.path.splitext(os.path.basename(spec))[0], spec
        if name in named:
            raise CNAError(f"two circuits are named {name!r}: give each --circuit a distinct NAME=PATH")
        named[name] = path
    return named
