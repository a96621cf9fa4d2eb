"""File and terminal output: atomic files, CSV text, and text from files made safe for a terminal.

Atomic file output: a reader never sees a half-written file, a failure leaves none behind.

Temporary files and staging folders carry the writing process's id in their hidden names
(`.NAME.PID.RANDOM.tmp`, `.NAME.PID.RANDOM.staging`), so the next run into the same place can
remove those that a killed run left behind without touching a concurrent run's.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import CNAError

_LEFTOVER_SUFFIXES = (".tmp", ".staging", ".old")
JSON_LIMIT = 16 << 20  # every JSON file the tool reads (sidecars, configs, memos) is a few KB


def read_json(path: str | os.PathLike, what: str, limit: int = JSON_LIMIT) -> Any:
    """The JSON value in the file `path`, read with a size cap; a CNAError naming `what` when it cannot be read.

    The size is checked on the open file (not before opening it), and at most `limit` + 1 bytes are read,
    so a huge or growing file, a FIFO or a device never makes the tool read without bound.
    """
    if os.path.exists(path) and not os.path.isfile(path):
        raise CNAError(f"{what} {str(path)!r} is not a regular file: check the path")
    try:
        with open(path, "rb") as handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise CNAError(f"cannot read {what} {str(path)!r}: {error.strerror or error}") from None
    if len(data) > limit:
        raise CNAError(f"{what} {str(path)!r} is larger than {limit >> 20} MB: it is not a file this tool wrote; "
                       "check the path")
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        raise CNAError(f"cannot read {what} {str(path)!r}: not valid JSON ({error}); the file is damaged") from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it over `path`, on error delete it."""
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise CNAError(f"output folder {str(target.parent)!r} does not exist: create it first")
    remove_leftovers(target)
    fd, tmp_name = tempfile.mkstemp(prefix=staging_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextlib.contextmanager
def atomic_outputs(paths: Iterable[str | os.PathLike | None], done: list | None = None) -> Iterator[dict[str, Path]]:
    """Write a set of files all or nothing: yield {path: temporary path}; move them all in place at the end.

    A failure (a full disk on the last file) or Ctrl-C leaves none of the new files, so a command
    never stops with a partial output set: Ctrl-C is held back while the files are moved in place
    (and delivered just after). None entries (outputs not asked for) are skipped. `done`, if given,
    receives the paths once all of them are in place.
    """
    with contextlib.ExitStack() as stack:
        temporaries = {str(path): stack.enter_context(_kept_temporary(Path(path))) for path in paths if path}
        yield temporaries
        with _interrupts_held():
            for path, tmp in temporaries.items():
                if tmp.exists():
                    os.replace(tmp, path)
            if done is not None:
                done.extend(temporaries)


@contextlib.contextmanager
def _interrupts_held() -> Iterator[None]:
    """Hold SIGINT back (POSIX, main thread) for a few renames that must happen all together."""
    import signal
    import threading

    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def _kept_temporary(target: Path) -> Iterator[Path]:
    """A temporary path beside `target` (no file yet), deleted on exit unless it was moved away."""
    if not target.parent.is_dir():
        raise CNAError(f"output folder {str(target.parent)!r} does not exist: create it first")
    remove_leftovers(target)
    fd, name = tempfile.mkstemp(prefix=staging_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()  # the writer creates it (atomically, itself): only the unique name is reserved
    try:
        yield tmp
    finally:
        if tmp.exists():
            tmp.unlink()


def umask() -> int:
    """The process's file-creation mask (read without changing it for long)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def apply_umask(folder: Path) -> None:
    """Give a folder tree made by mkdtemp/mkstemp (0700/0600) the permissions the user's umask asks for."""
    mask = umask()
    os.chmod(folder, 0o777 & ~mask)
    for root, folders, files in os.walk(folder):
        for name in folders:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def staging_prefix(target: Path) -> str:
    """Prefix of a hidden temporary beside `target` that names its owner process (see remove_leftovers)."""
    return f".{target.name}.{os.getpid()}."


def remove_leftovers(target: Path) -> None:
    """Delete hidden temporaries of `target` left by runs that are no longer alive (killed or crashed)."""
    suffixes = "|".join(map(re.escape, _LEFTOVER_SUFFIXES))
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(\d+)\.[A-Za-z0-9_]+({suffixes})")
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if match.group(2) == ".old" and not target.exists():
            continue  # killed between the two renames of an export: the previous export is all there is; keep it
        with contextlib.suppress(OSError):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def csv_text(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    """Rows as CSV text with a header (columns: default, the first row's keys)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns if columns is not None else rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def printable(value: Any, keep_newlines: bool = False) -> str:
    """Text from a file or a model, safe for a terminal: control characters (escape sequences) are shown escaped."""
    kept = "\n\t" if keep_newlines else ""
    return "".join(char if char.isprintable() or char in kept else char.encode("unicode_escape").decode("ascii")
                   for char in str(value))
