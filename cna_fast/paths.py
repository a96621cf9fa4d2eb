"""Where inputs come from and outputs go, checked before any work.

A run never writes over one of its inputs or over another of its outputs, never starts a long
computation whose outputs cannot be written, and never deletes a folder it did not make: `--force`
replaces only a previous export (a folder holding the provenance file `EXPORT_MARKER`).
"""
from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from ._io import apply_umask, read_json, remove_leftovers, staging_prefix
from .errors import CNAError

EXPORT_MARKER = "cna_fast_steering.json"
_CONFIG_LIMIT = 16 << 20  # a model's config.json is a few KB


def resolved(path: str | os.PathLike) -> Path:
    """Absolute path with `~` expanded and symlinks followed (as far as they exist)."""
    return Path(os.path.expanduser(str(path))).resolve()


def describe_kind(path: Path) -> str:
    """What is at `path`, for messages: 'does not exist', 'is a folder', 'is a named pipe (FIFO)', ..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist"
    except OSError as error:
        return f"cannot be read ({error.strerror})"
    kinds = ((stat.S_ISDIR, "is a folder"), (stat.S_ISFIFO, "is a named pipe (FIFO)"),
             (stat.S_ISCHR, "is a character device"), (stat.S_ISBLK, "is a block device"),
             (stat.S_ISSOCK, "is a socket"), (stat.S_ISREG, "is a file"))
    return next((text for test, text in kinds if test(mode)), "is not a regular file")


def require_file(path: str | os.PathLike, what: str) -> Path:
    """`path` as a Path if it is a regular file (symlinks followed); else a CNAError saying what it is."""
    target = Path(os.path.expanduser(str(path)))
    kind = describe_kind(target)
    if kind != "is a file":
        fix = "give the path of a file" if kind != "does not exist" else "check the path"
        raise CNAError(f"{what} {str(path)!r} {kind}, not a regular file: {fix}")
    return target


def check_writable(folder: Path, label: str) -> None:
    """Fail now, not after the compute, when nothing can be created in `folder`."""
    if not folder.is_dir():
        raise CNAError(f"output folder {str(folder)!r} of {label} {describe_kind(folder)}: create it first")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cna-write-test.", dir=folder)
    except OSError as error:
        raise CNAError(f"cannot write {label} into {str(folder)!r}: {_reason(error)}") from None
    os.close(fd)
    os.unlink(probe)


def _reason(error: OSError) -> str:
    if error.errno == errno.EROFS:
        return "the file system is read-only; choose a folder on a writable disk"
    if error.errno in (errno.EACCES, errno.EPERM):
        return "permission denied; choose a folder you may write to"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device; free some space or choose another disk"
    return f"{error.strerror}; choose another folder"


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | None] = {}) -> None:
    """Output files (option name -> path; None = not asked for) against each other and the inputs.

    Each must be a non-empty name, differ from every other output and every input (paths resolved,
    symlinks followed), not replace a file inside an input folder, not be a folder or a special
    file, and have a writable parent folder.
    """
    sources = {label: resolved(path) for label, path in inputs.items() if path and not str(path).startswith("hf:")}
    taken: dict[Path, str] = {}
    for label, path in outputs.items():
        if path is None:
            continue
        if not str(path).strip():
            raise CNAError(f"{label} is empty: give a file name")
        target = resolved(path)
        if target in taken:
            raise CNAError(f"{label} and {taken[target]} name the same file {str(path)!r}: give each output its "
                           "own name")
        for source_label, source in sources.items():
            if target == source:
                raise CNAError(f"{label} {str(path)!r} is the input {source_label}: writing it would destroy the "
                               "input; choose another output name")
            if source.is_dir() and source in target.parents:
                what = "would replace a file" if target.exists() else "would write a file"
                raise CNAError(f"{label} {str(path)!r} {what} inside the {source_label} folder {str(source)!r}: an "
                               "input folder is never written to; write it elsewhere")
        if target.exists() and not target.is_file():
            raise CNAError(f"{label} {str(path)!r} {describe_kind(target)}: give a file name such as "
                           "circuit.safetensors")
        check_writable(target.parent, label)
        taken[target] = label


def check_distinct_inputs(first: tuple[str, str | os.PathLike], second: tuple[str, str | os.PathLike]) -> None:
    """Refuse two prompt files with the same content: the contrast would be empty."""
    (label_a, path_a), (label_b, path_b) = first, second
    if str(path_a).startswith("hf:") or str(path_b).startswith("hf:"):
        if str(path_a) == str(path_b):
            raise CNAError(f"{label_a} and {label_b} are the same dataset: give two different prompt sets")
        return
    a, b = resolved(path_a), resolved(path_b)
    if not (a.is_file() and b.is_file()):
        return
    if a == b or (a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes()):
        raise CNAError(f"{label_a} and {label_b} hold the same prompts ({str(path_a)!r}, {str(path_b)!r}): "
                       "the contrast would be empty; give two different prompt sets")


def _forbidden_folders(inputs: Iterable[Path]) -> dict[Path, str]:
    """Folders an export must never replace: /, home, the working folder and its ancestors, the inputs."""
    forbidden = {Path("/"): "the root folder", Path.home().resolve(): "your home folder"}
    cwd = Path.cwd().resolve()
    forbidden.update({folder: "an ancestor of the working folder" for folder in cwd.parents})
    forbidden[cwd] = "the working folder"
    for source in inputs:
        forbidden.update({folder: f"a folder that holds the input {str(source)!r}" for folder in source.parents})
        forbidden[source] = f"the input {str(source)!r}"
    return forbidden


def check_export_folder(path: str | os.PathLike, force: bool,
                        inputs: Iterable[str | os.PathLike | None] = ()) -> Path:
    """The resolved export folder, if it may be (re)written; else a CNAError before any work.

    New or empty folders are fine. A non-empty one is replaced only with `force`, and only when it
    is a previous export (holds EXPORT_MARKER). Never /, home, the working folder or its
    ancestors, an input or a folder that holds an input.
    """
    if not str(path).strip():
        raise CNAError("the export folder name is empty: give a new folder such as --out steered-model")
    target = resolved(path)
    sources = [resolved(source) for source in inputs if source and os.path.exists(os.path.expanduser(str(source)))]
    reason = _forbidden_folders(sources).get(target)
    if reason is not None:
        raise CNAError(f"refusing to write an export to {str(path)!r}: it is {reason}; choose a new folder")
    if target.exists():
        if not target.is_dir():
            raise CNAError(f"export folder {str(path)!r} {describe_kind(target)}: choose a new folder")
        if any(target.iterdir()):
            if not force:
                raise CNAError(f"output folder {str(path)!r} is not empty: choose another, or pass --force "
                               "(force=True) to replace a previous export")
            if not (target / EXPORT_MARKER).is_file():
                raise CNAError(f"output folder {str(path)!r} is not empty and is not a cna_fast export (it has no "
                               f"{EXPORT_MARKER}): --force only replaces previous exports; choose a new folder")
    if not target.parent.is_dir():
        raise CNAError(f"parent folder of {str(path)!r} does not exist: create it first")
    check_writable(target.parent, "the export")
    return target


class OutputFolder:
    """Write an export into a hidden staging folder beside `path`, then move it into place.

    On error the staging folder is removed and an existing export is kept; on success a previous
    export is replaced (renamed aside first, deleted last). Files get the user's umask.
    """

    def __init__(self, path: str | os.PathLike, force: bool, inputs: Iterable[str | os.PathLike | None] = ()) -> None:
        self.inputs = list(inputs)
        self.force = force
        self.path = check_export_folder(path, force, self.inputs)

    def __enter__(self) -> Path:
        remove_leftovers(self.path)
        self.staging = Path(tempfile.mkdtemp(prefix=staging_prefix(self.path), suffix=".staging",
                                             dir=self.path.parent))
        return self.staging

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            return
        try:
            apply_umask(self.staging)
            check_export_folder(self.path, self.force, self.inputs)  # again: the folder may have changed
            old = None
            if self.path.exists():
                old = Path(tempfile.mkdtemp(prefix=staging_prefix(self.path), suffix=".old", dir=self.path.parent))
                os.rename(self.path, old / "previous")
            try:
                os.rename(self.staging, self.path)
            except BaseException:
                if old is not None:  # put the previous export back
                    os.rename(old / "previous", self.path)
                    old.rmdir()
                raise
        except BaseException:
            shutil.rmtree(self.staging, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def check_model_folder(name: str | os.PathLike | None, label: str = "model folder") -> None:
    """A local model folder must hold a readable config.json naming a model type transformers knows."""
    if name is None:
        return
    folder = Path(os.path.expanduser(str(name)))
    if not folder.is_dir():
        return  # a hub id, or a missing path that load_model reports
    config = folder / "config.json"
    if not config.is_file() and any(folder.glob("*.gguf")):
        return  # a GGUF model folder: its loader reads the configuration from the GGUF file
    if not config.is_file():
        contents = "is empty" if not any(folder.iterdir()) else "has no config.json"
        raise CNAError(f"{label} {str(name)!r} {contents}: pass a Hugging Face model folder (config.json, "
                       "weights, tokenizer files)")
    try:
        settings = read_json(config, "model configuration", _CONFIG_LIMIT)
    except CNAError as error:
        raise CNAError(f"{error}; the model folder {str(name)!r} is damaged or not a model") from None
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise CNAError(f"{str(config)!r} names no model_type: the model folder is damaged or not a transformers "
                       "model")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        raise CNAError(f"model folder {str(name)!r} is of type {model_type!r}, which this transformers version does "
                       "not know: use a supported architecture (see README) or upgrade transformers")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CNAError(f"model folder {str(name)!r} holds a {model_type!r} model, which is not a causal language "
                       "model: use a decoder LM such as Llama, Qwen, Gemma or GPT-2")
