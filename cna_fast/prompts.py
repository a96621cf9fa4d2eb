"""Prompt sets: read .txt / .jsonl / .csv files, and the sets bundled with the package."""
from __future__ import annotations

import csv
import json
import os
from importlib import resources
from pathlib import Path

from .errors import CNAError

PROMPT_FIELDS = ("prompt", "text")
FORMATS = (".txt", ".jsonl", ".csv")
BUNDLED = ("french_questions", "english_questions", "french_heldout")


def read_prompts(path: str | os.PathLike) -> list[str]:
    """Prompts from a file: .txt (one per line), .jsonl (a "prompt" or "text" field) or .csv (a "prompt" column).

    Blank lines are skipped. A missing, unreadable or prompt-less file is a CNAError naming it.
    """
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix not in FORMATS:
        raise CNAError(f"prompt file {str(file)!r} has an unknown extension: use one of {', '.join(FORMATS)}")
    try:
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CNAError(f"prompt file {str(file)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CNAError(f"cannot read prompt file {str(file)!r}: {error}") from None
    if suffix == ".txt":
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    elif suffix == ".jsonl":
        prompts = _jsonl_prompts(text, file)
    else:
        prompts = _csv_prompts(text, file)
    if not prompts:
        raise CNAError(f"prompt file {str(file)!r} contains no prompts")
    return prompts


def _jsonl_prompts(text: str, file: Path) -> list[str]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CNAError(f"{file}:{number}: not valid JSON ({error.msg})") from None
        value = next((record[key] for key in PROMPT_FIELDS if isinstance(record, dict) and key in record), None)
        if not isinstance(value, str) or not value.strip():
            raise CNAError(f"{file}:{number}: needs a non-empty string field 'prompt' or 'text'")
        prompts.append(value)
    return prompts


def _csv_prompts(text: str, file: Path) -> list[str]:
    reader = csv.DictReader(text.splitlines())
    column = next((name for name in PROMPT_FIELDS if name in (reader.fieldnames or [])), None)
    if column is None:
        raise CNAError(f"{file}: needs a 'prompt' (or 'text') column; found columns {reader.fieldnames}")
    prompts = []
    for number, row in enumerate(reader, start=2):
        value = (row.get(column) or "").strip()
        if not value:
            raise CNAError(f"{file}:{number}: empty {column!r} value")
        prompts.append(value)
    return prompts


def bundled_prompts(name: str) -> list[str]:
    """A prompt set shipped with the package: french_questions, english_questions, french_heldout."""
    if name not in BUNDLED:
        raise CNAError(f"unknown bundled prompt set {name!r}: choose one of {', '.join(BUNDLED)}")
    text = resources.files("cna_fast").joinpath(f"data/{name}.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip()]
