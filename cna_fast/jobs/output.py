"""The results file of a batch job: whole JSON lines appended and synced, checked and repaired on resume."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .._io import write_text_atomic
from ..errors import CNAError

SIDECAR_SUFFIX = ".job.json"
SYNC_SECONDS = 1.0  # fsync at most this often (and at close): a kill loses nothing, a power cut at most ~1 s


def sidecar_path(path: str | os.PathLike) -> Path:
    """Where a results file's job settings are kept: OUT.job.json beside it."""
    return Path(f"{os.fspath(path)}{SIDECAR_SUFFIX}")


def _end_of_last_line(fd: int, size: int) -> int:
    """Offset just past the file's last newline (0 if it has none): everything after it is a torn line."""
    position = size
    while position > 0:
        start = max(0, position - (1 << 16))
        newline = os.pread(fd, position - start, start).rfind(b"\n")
        if newline >= 0:
            return start + newline + 1
        position = start
    return 0


def _lock(fd: int, path: Path) -> None:
    """Refuse a second job writing the same file at the same time (POSIX advisory lock)."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks, nothing to check
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise CNAError(f"another job is writing {str(path)!r}: wait for it to finish, or choose another --out"
                       ) from None


class JobOutput:
    """An open results file, append-only: `done` holds the ids it already has.

    A new (or empty) file gets the job's settings written beside it. An existing one must have been
    written with the same settings; its torn last line, if any, is cut (`repaired` says so).
    """

    def __init__(self, path: str | os.PathLike, settings: dict) -> None:
        self.path = Path(path)
        if not self.path.parent.is_dir():
            raise CNAError(f"output folder {str(self.path.parent)!r} does not exist: create it first")
        if self.path.is_dir():
            raise CNAError(f"output {str(self.path)!r} is a folder: give a file name such as results.jsonl")
        self.sidecar = sidecar_path(self.path)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            _lock(self._fd, self.path)
            self.done, self.repaired = self._resume(json.loads(json.dumps(settings)))
        except BaseException:
            os.close(self._fd)
            raise
        self._synced = time.monotonic()

    def _resume(self, settings: dict) -> tuple[set, bool]:
        size = os.fstat(self._fd).st_size
        if size == 0:
            write_text_atomic(self.sidecar, json.dumps({"cna_fast_job": 1, "settings": settings}, indent=2,
                                                       sort_keys=True) + "\n")
            return set(), False
        self._check_settings(settings)
        end = _end_of_last_line(self._fd, size)
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        return self._written_ids(), end < size

    def _check_settings(self, settings: dict) -> None:
        try:
            stored = json.loads(self.sidecar.read_text(encoding="utf-8"))["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            raise CNAError(f"{str(self.path)!r} exists but has no readable job settings ({self.sidecar.name}): it was "
                           "not written by `cna generate --out`. Choose another --out, or delete the file") from None
        changed = sorted(key for key in settings.keys() | stored.keys() if settings.get(key) != stored.get(key))
        if changed:
            raise CNAError(f"{str(self.path)!r} was written with different settings ({', '.join(changed)} changed): "
                           "resuming would mix two jobs. Rerun with the same settings, or choose another --out")

    def _written_ids(self) -> set:
        done: set = set()
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                try:
                    record_id = json.loads(line)["id"]
                    hash(record_id)
                except (ValueError, KeyError, TypeError):
                    raise CNAError(f"{self.path}:{number}: not a record of this job; the file was edited. Remove the "
                                   "line, or choose another --out") from None
                if record_id in done:
                    raise CNAError(f"{self.path}:{number}: record id {record_id!r} appears twice; the file was "
                                   "edited or concatenated. Remove the duplicate line, or choose another --out")
                done.add(record_id)
        return done

    def write(self, record: dict) -> None:
        """Append one record as one JSON line, in as few writes as the OS allows; sync now and then."""
        data = memoryview((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
        while data:
            data = data[os.write(self._fd, data):]
        if time.monotonic() - self._synced >= SYNC_SECONDS:
            os.fsync(self._fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        """Sync and close (releasing the lock)."""
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
