"""The results file of a batch job: whole JSON lines appended and synced, checked and repaired on resume."""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .._io import read_json, write_text_atomic
from ..errors import CNAError

SIDECAR_SUFFIX = ".job.json"
SIDECAR_TAG = "cna_fast_job"
FINISH_REASONS = ("stop", "length")
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


_FIELDS = {"id": (int, str), "prompt": str, "output": str, "circuit": (str, type(None)),
           "multiplier": (int, float, type(None)), "finish_reason": str, "prompt_tokens": int, "output_tokens": int}


def record_problem(line: bytes, settings: dict) -> str | None:
    """What is wrong with a results line as a record of the job with `settings` (None: it is one).

    A record has exactly the fields a job writes, each of its type, a finish reason the job gives,
    token counts that are whole numbers, and a circuit and multiplier this job can have written.
    """
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return "not valid JSON"
    if not isinstance(record, dict):
        return f"a JSON {type(record).__name__}, not an object"
    if set(record) != set(_FIELDS):
        missing, extra = sorted(set(_FIELDS) - set(record)), sorted(set(record) - set(_FIELDS))
        return f"missing fields {missing or 'none'}, unexpected fields {extra or 'none'}"
    for name, kinds in _FIELDS.items():
        if isinstance(record[name], bool) or not isinstance(record[name], kinds):
            return f"field {name} is {record[name]!r}"
    if record["finish_reason"] not in FINISH_REASONS:
        return f"finish_reason {record['finish_reason']!r} is not one of {', '.join(FINISH_REASONS)}"
    if record["prompt_tokens"] < 1 or record["output_tokens"] < 1:
        return "token counts must be at least 1"
    if record["output_tokens"] > settings.get("max_new_tokens", float("inf")):
        return f"{record['output_tokens']} output tokens, more than max_new_tokens {settings.get('max_new_tokens')}"
    circuits = settings.get("circuits") or {}
    if (record["circuit"] is None) != (not circuits) or (record["multiplier"] is None) != (not circuits):
        return "its circuit and multiplier do not fit the job's circuits"
    if circuits and record["circuit"] not in circuits:
        return f"circuit {record['circuit']!r} is not one of the job's circuits"
    if record["multiplier"] is not None and not math.isfinite(record["multiplier"]):
        return f"multiplier {record['multiplier']!r} is not finite"
    return None


class JobOutput:
    """An open results file, append-only: `done` maps the ids it already has to (line number, prompt).

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
            if self.sidecar.exists() or self.sidecar.is_symlink():
                self._stored_settings()  # replace only a sidecar of an earlier job, never another file
            write_text_atomic(self.sidecar, json.dumps({SIDECAR_TAG: 1, "settings": settings}, indent=2,
                                                       sort_keys=True) + "\n")
            return {}, False
        self._check_settings(settings)
        end = _end_of_last_line(self._fd, size)
        if end < size:
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        return self._written_ids(settings), end < size

    def _stored_settings(self) -> dict:
        """The settings in the job's sidecar; a CNAError unless it is a sidecar this tool wrote."""
        problem = None
        if self.sidecar.is_symlink() or not self.sidecar.is_file():
            problem = "is missing" if not self.sidecar.exists() else "is not a regular file"
        else:
            try:
                stored = read_json(self.sidecar, "job settings")
            except CNAError as error:
                problem = f"cannot be read ({error})"
            else:
                if not isinstance(stored, dict) or stored.get(SIDECAR_TAG) != 1:
                    problem = "is not a cna_fast job sidecar"
                elif not isinstance(stored.get("settings"), dict):
                    problem = f"holds settings of type {type(stored.get('settings')).__name__}, not an object"
                else:
                    return stored["settings"]
        raise CNAError(f"the job settings file {str(self.sidecar)!r} of {str(self.path)!r} {problem}: a batch job "
                       "writes its settings there, and this file was not written by `cna generate --out`. Move it "
                       "away, or choose another --out")

    def _check_settings(self, settings: dict) -> None:
        stored = self._stored_settings()
        changed = sorted(key for key in settings.keys() | stored.keys() if settings.get(key) != stored.get(key))
        if changed:
            raise CNAError(f"{str(self.path)!r} was written with different settings ({', '.join(changed)} changed): "
                           "resuming would mix two jobs. Rerun with the same settings, or choose another --out")

    def _written_ids(self, settings: dict) -> dict:
        """{id: (line number, prompt)} of the records already written, each checked to be a whole record of this job."""
        done: dict = {}
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle, start=1):
                problem = record_problem(line, settings)
                if problem:
                    raise CNAError(f"{self.path}:{number}: not a record of this job ({problem}); the file was edited. "
                                   "Remove the line, or choose another --out")
                record = json.loads(line)
                if record["id"] in done:
                    raise CNAError(f"{self.path}:{number}: record id {record['id']!r} appears twice; the file was "
                                   "edited or concatenated. Remove the duplicate line, or choose another --out")
                done[record["id"]] = (number, record["prompt"])
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
