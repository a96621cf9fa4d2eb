"""Prompt sets: files (.txt / .jsonl / .csv) read lazily, Hugging Face datasets, and bundled sets."""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable, Iterator

from .errors import CNAError
from .paths import require_file

PROMPT_FIELDS = ("prompt", "text")
FORMATS = (".txt", ".jsonl", ".csv")
BUNDLED = ("french_questions", "english_questions", "french_heldout")
HF_PREFIX = "hf:"
_BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be used: where it is and why."""

    line: int
    reason: str


@dataclass(frozen=True)
class PromptRecord:
    """A usable record: its line (record number for datasets), its prompt, and all its fields (jsonl, csv, dataset)."""

    line: int
    prompt: str
    fields: dict


class PromptSource:
    """A prompt set read lazily, record by record, so its size never matters.

    spec: a .txt file (one prompt per line, blank lines ignored), a .jsonl file (a "prompt" or
    "text" field), a .csv file (a "prompt" or "text" column), or `hf:NAME:SPLIT:COLUMN` for a
    Hugging Face dataset (NAME may be a folder written by `save_to_disk`).
    skip_bad: skip bad records (missing field, empty text, undecodable line) and list them in
    `bad`; otherwise the first one raises a CNAError naming its line.
    """

    def __init__(self, spec: str | os.PathLike, *, skip_bad: bool = False) -> None:
        self.spec = str(spec)
        self.skip_bad = skip_bad
        self.bad: list[BadRecord] = []
        if self.spec.startswith(HF_PREFIX):
            parts = self.spec[len(HF_PREFIX):].rsplit(":", 2)
            if len(parts) != 3 or not all(parts):
                raise CNAError(f"{self.spec!r}: write a dataset as hf:NAME:SPLIT:COLUMN, e.g. "
                               "hf:tatsu-lab/alpaca:train:instruction")
            self.dataset, self.split, self.column = parts
            self.path = None
        else:
            self.path = require_file(self.spec, "prompt file")  # a folder, FIFO or device says what it is
            suffix = self.path.suffix.lower()
            if suffix not in FORMATS:
                raise CNAError(f"prompt file {self.spec!r} has an unknown extension: use one of {', '.join(FORMATS)} "
                               f"or {HF_PREFIX}NAME:SPLIT:COLUMN")
            self.suffix = suffix

    def __iter__(self) -> Iterator[str]:
        return (record.prompt for record in self.records())

    def records(self) -> Iterator[PromptRecord]:
        """The usable records with their line numbers and fields; bad ones are handled as in iteration."""
        self.bad = []
        records = self._dataset_records() if self.path is None else self._file_records()
        for line, value, fields in records:
            reason = None
            if isinstance(value, BadRecord):
                reason = value.reason
            elif not isinstance(value, str):
                reason = f"expected text, got {type(value).__name__}"
            elif not value.strip():
                reason = "empty text"
            if reason is None:
                yield PromptRecord(line, value, fields)
                continue
            self.bad.append(BadRecord(line, reason))
            if not self.skip_bad:
                raise CNAError(f"{self.spec}:{line}: {reason} (fix the record, or pass --skip-bad / skip_bad=True)")

    def _lines(self, keep_newlines: bool = False) -> Iterator[tuple[int, str | BadRecord]]:
        try:
            handle = open(self.path, "rb")
        except OSError as error:
            raise CNAError(f"cannot read prompt file {self.spec!r}: {error}") from None
        with handle:
            for number, raw in enumerate(handle, start=1):
                if number == 1 and raw.startswith(_BOM):
                    raw = raw[len(_BOM):]  # Excel's "CSV UTF-8" and Notepad write a byte-order mark
                try:
                    line = raw.decode("utf-8")
                    yield number, line if keep_newlines else line.rstrip("\r\n")
                except UnicodeDecodeError:
                    yield number, BadRecord(number, "not valid UTF-8")

    def _file_records(self) -> Iterator[tuple[int, object, dict]]:
        if self.suffix == ".txt":
            for number, line in self._lines():
                if isinstance(line, BadRecord) or line.strip():
                    yield number, line if isinstance(line, BadRecord) else line.strip(), {}
        elif self.suffix == ".jsonl":
            for number, line in self._lines():
                if isinstance(line, BadRecord):
                    yield number, line, {}
                elif line.strip():
                    yield number, *_json_prompt(line)
        else:
            yield from self._csv_records()

    def _csv_records(self) -> Iterator[tuple[int, object, dict]]:
        undecodable: list[int] = []

        def decoded() -> Iterator[str]:
            for number, line in self._lines(keep_newlines=True):  # quoted fields may span lines
                if isinstance(line, BadRecord):
                    undecodable.append(number)
                    yield ""  # an empty row, reported below with its line number
                else:
                    yield line

        reader = csv.reader(decoded(), strict=True)  # strict: an unterminated quoted cell is an error
        try:
            header = next(reader, None)
            column = next((header.index(name) for name in PROMPT_FIELDS if header and name in header), None)
            if column is None:
                raise CNAError(f"{self.spec}: needs a 'prompt' (or 'text') column; found columns {header}")
            for row in reader:
                while undecodable:
                    number = undecodable.pop(0)
                    yield number, BadRecord(number, "not valid UTF-8"), {}
                if row:
                    yield reader.line_num, row[column] if column < len(row) else BadRecord(
                        reader.line_num, "row has no prompt column"), dict(zip(header, row))
        except csv.Error as error:
            raise CNAError(f"{self.spec}:{reader.line_num}: malformed CSV ({error})") from None

    def _dataset_records(self) -> Iterator[tuple[int, object, dict]]:
        try:
            import datasets
        except ImportError:
            raise CNAError("hf: prompt sources need the datasets package: pip install datasets") from None
        try:
            if os.path.isdir(self.dataset):
                data = datasets.load_from_disk(self.dataset)
                data = data[self.split] if isinstance(data, datasets.DatasetDict) else data
            else:
                data = datasets.load_dataset(self.dataset, split=self.split, streaming=True)
        except Exception as error:  # datasets raises many types for missing or offline data
            raise CNAError(f"cannot open dataset {self.dataset!r} split {self.split!r}: {error}. Offline machines "
                           "need the dataset cached or saved to disk (hf:FOLDER:SPLIT:COLUMN)") from None
        for number, record in enumerate(data, start=1):
            yield number, record[self.column] if self.column in record else BadRecord(
                number, f"no column {self.column!r} (columns: {', '.join(record)})"), dict(record)

    def content_hash(self) -> str:
        """SHA-256 of the prompts' content, to tie checkpoints and resumed jobs to their inputs: a file's bytes;
        for `hf:` sources the spec and the dataset folder's files (a save_to_disk folder), or else every record
        of the dataset as it is read now (a rewritten or updated dataset gets a new hash)."""
        digest = hashlib.sha256()
        if self.path is None:
            digest.update(self.spec.encode())
            if os.path.isdir(self.dataset):
                root = Path(self.dataset)
                for file in sorted(p for p in root.rglob("*") if p.is_file()):
                    digest.update(b"\0" + str(file.relative_to(root)).encode() + b"\0")
                    with open(file, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
            else:
                for number, prompt, fields in self._dataset_records():
                    digest.update(json.dumps([number, str(prompt), sorted(fields)], default=str).encode())
            return digest.hexdigest()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def _json_prompt(line: str) -> tuple[object, dict]:
    """The prompt of one jsonl line (or why it has none) and the record's fields."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return BadRecord(0, f"not valid JSON ({error.msg})"), {}
    if not isinstance(record, dict):
        return BadRecord(0, "not a JSON object"), {}
    value = next((record[key] for key in PROMPT_FIELDS if key in record), None)
    return (value if value is not None else BadRecord(0, "no 'prompt' or 'text' field")), record


def open_prompt_source(spec: str | os.PathLike, *, skip_bad: bool = False) -> PromptSource:
    """A lazy prompt source, checked now: it must hold at least one usable prompt."""
    source = PromptSource(spec, skip_bad=skip_bad)
    if next(iter(source), None) is None:
        raise CNAError(f"prompt file {str(spec)!r} contains no prompts")
    return source


def read_prompts(path: str | os.PathLike, *, skip_bad: bool = False) -> list[str]:
    """All prompts of a file or dataset as a list (see PromptSource); an empty set is a CNAError."""
    prompts = list(PromptSource(path, skip_bad=skip_bad))
    if not prompts:
        raise CNAError(f"prompt file {str(path)!r} contains no prompts")
    return prompts


def bundled_text(filename: str) -> str:
    """The text of a data file shipped with the package (cna_fast/data/)."""
    return resources.files("cna_fast").joinpath(f"data/{filename}").read_text(encoding="utf-8")


def bundled_prompts(name: str) -> list[str]:
    """A prompt set shipped with the package: french_questions, english_questions, french_heldout."""
    if name not in BUNDLED:
        raise CNAError(f"unknown bundled prompt set {name!r}: choose one of {', '.join(BUNDLED)}")
    return [line for line in bundled_text(f"{name}.txt").splitlines() if line.strip()]


def bundled_diverse_prompts() -> dict[str, list[str]]:
    """The built-in diverse prompt set of the universal-neuron filter: topic -> prompts."""
    groups: dict[str, list[str]] = {}
    for line in bundled_text("diverse.jsonl").splitlines():
        record = json.loads(line)
        groups.setdefault(record["topic"], []).append(record["prompt"])
    return groups


def prompts_hash(prompts: Iterable[str]) -> str:
    """A hash that identifies a prompt set: the file's bytes for a PromptSource, the texts for a list."""
    if isinstance(prompts, PromptSource):
        return prompts.content_hash()
    if isinstance(prompts, (list, tuple)):
        digest = hashlib.sha256()
        for prompt in prompts:
            digest.update(str(prompt).encode("utf-8") + b"\0")
        return digest.hexdigest()
    raise CNAError("checkpointing needs re-readable prompt sets (a list or a PromptSource), not a one-shot iterator")


# Public prompt sets of the paper's evaluations: (dataset, config, split, column).
BENCHMARK_DATASETS = {
    "jbb-harmful": ("JailbreakBench/JBB-Behaviors", "behaviors", "harmful", "Goal"),
    "jbb-benign": ("JailbreakBench/JBB-Behaviors", "behaviors", "benign", "Goal"),
    "advbench": ("walledai/AdvBench", None, "train", "prompt"),
    "alpaca": ("tatsu-lab/alpaca", None, "train", "instruction"),
}


def load_benchmark(name: str, limit: int | None = None) -> list[str]:
    """Prompts of JBB-Behaviors (harmful/benign), AdvBench or harmless Alpaca (instructions without input).

    Needs the `datasets` package and network access or a Hugging Face cache with the dataset.
    """
    if name not in BENCHMARK_DATASETS:
        raise CNAError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARK_DATASETS)}")
    try:
        import datasets
    except ImportError:
        raise CNAError("benchmark datasets need the datasets package: pip install datasets") from None
    path, config, split, column = BENCHMARK_DATASETS[name]
    try:
        data = datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline, missing cache, gated dataset: datasets raises many types
        raise CNAError(f"cannot load {name} ({path}): {type(error).__name__}: {str(error)[:200]}. This needs "
                       "network access or the dataset in the Hugging Face cache; offline, use local prompt files "
                       "or hf:FOLDER:SPLIT:COLUMN for a dataset saved with save_to_disk") from None
    if name == "alpaca":
        data = data.filter(lambda record: not record["input"])
    prompts = [text for text in data[column] if isinstance(text, str) and text.strip()]
    return prompts[:limit] if limit is not None else prompts
