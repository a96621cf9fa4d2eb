"""A streaming, resumable generation job: prompts read lazily, one JSON line written per finished record.

Each output line holds the record's id, prompt, output, circuit name, multiplier, finish reason and
token counts; lines are written whole and in completion order (match them to inputs by id). The
job's settings (model, circuits, generation options, the prompt file's hash) sit in a sidecar
`OUT.job.json`. A rerun with the same settings resumes: it cuts a torn last line, skips the ids
already written and appends the rest, so the file never holds a duplicate or a half record; a rerun
with different settings is refused instead of mixing two jobs in one file.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..batching import encode_prompts, generation_overflow, pad_token_id, windows
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError, positive_int
from ..prompts import PromptRecord, PromptSource
from ..settings import with_options
from ..steering import GenerationSettings, circuit_key
from .continuous import Completion, ContinuousBatcher, Request
from .output import JobOutput


@dataclass(frozen=True)
class JobRecord:
    """One input record: its id, prompt, and the circuit and multiplier it is generated with."""

    id: int | str
    prompt: str
    circuit: str | None
    multiplier: float | None


@dataclass
class JobSummary:
    """What a run did: records written now, records already written before, bad records skipped, new tokens."""

    written: int = 0
    resumed: int = 0
    bad: list[str] = field(default_factory=list)
    new_tokens: int = 0
    seconds: float = 0.0


class JobCircuits:
    """Named circuits as columns of the per-row multiplier table (identical neuron sets share a column)."""

    def __init__(self, circuits: Circuit | Mapping[str, Circuit] | None, default_multiplier: float,
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(circuits, Circuit):
            circuits = {str(circuits.meta.get("name", "circuit")): circuits}
        if circuits is not None and not isinstance(circuits, Mapping):
            raise CNAError(f"circuits must be a Circuit or a dict {{name: Circuit}}, got {type(circuits).__name__}: "
                           "for several circuits pass circuits={'a': circuit_a, 'b': circuit_b}")
        for name, circuit in (circuits or {}).items():
            if not isinstance(name, str) or not name or not isinstance(circuit, Circuit):
                raise CNAError(f"circuits must map names (text) to Circuits, got {name!r}: {type(circuit).__name__}")
        self.named = dict(circuits or {})
        self.dtype = dtype
        if self.named and _overflow(float(default_multiplier), dtype):
            raise CNAError(f"{_overflow(float(default_multiplier), dtype)}: use a smaller multiplier")
        self.default = next(iter(self.named), None)
        self.multiplier = float(default_multiplier) if self.named else None
        keys = list(dict.fromkeys(circuit_key(circuit) for circuit in self.named.values()))
        self.columns = {name: keys.index(circuit_key(circuit)) for name, circuit in self.named.items()}
        by_key = {circuit_key(circuit): circuit for circuit in self.named.values()}
        self.distinct = [by_key[key] for key in keys] or None

    def table_row(self, record: JobRecord) -> list[float] | None:
        """The record's multipliers, one per distinct circuit: its multiplier in its circuit's column, 1 elsewhere."""
        if self.distinct is None:
            return None
        row = [1.0] * len(self.distinct)
        row[self.columns[record.circuit]] = record.multiplier
        return row

    def digests(self) -> dict:
        """A short digest of each named circuit's neuron set (what the job's settings record)."""
        return {name: hashlib.sha256(repr(circuit_key(circuit)).encode()).hexdigest()[:16]
                for name, circuit in self.named.items()}


def _record_id(record: PromptRecord) -> int | str:
    value = record.fields.get("id", record.line)
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"id must be a string or an integer, got {value!r}")
    return value


def _override(record: PromptRecord, circuits: JobCircuits) -> tuple[str | None, float | None]:
    """The record's circuit and multiplier: its own `circuit` / `multiplier` fields, else the job's."""
    name = record.fields.get("circuit", circuits.default)
    multiplier = record.fields.get("multiplier", circuits.multiplier)
    if not circuits.named:
        if "circuit" in record.fields or "multiplier" in record.fields:
            raise ValueError("has a circuit or multiplier field, but the job has no circuit")
        return None, None
    if not isinstance(name, str):
        raise ValueError(f"field circuit must be the name of one of the job's circuits ({', '.join(circuits.named)}), "
                         f"got a {type(name).__name__}: {name!r}")
    if name not in circuits.named:
        raise ValueError(f"circuit {name!r} is not one of the job's circuits ({', '.join(circuits.named)})")
    if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not math.isfinite(multiplier):
        raise ValueError(f"multiplier must be a finite number, got {multiplier!r}")
    overflow = _overflow(multiplier, circuits.dtype)
    if overflow:
        raise ValueError(overflow)
    return name, float(multiplier)


def _overflow(multiplier: float, dtype: torch.dtype) -> str | None:
    """Why `multiplier` cannot be applied in `dtype` (it is not finite there), or None."""
    largest = torch.finfo(dtype).max if dtype.is_floating_point else math.inf
    largest = min(largest, torch.finfo(torch.float32).max)  # the per-row multiplier table is float32
    if abs(multiplier) <= largest:
        return None
    return (f"multiplier {multiplier:g} overflows the model's dtype {str(dtype).removeprefix('torch.')} (its largest "
            f"value is {largest:.4g})")


def job_records(source: PromptSource, circuits: JobCircuits, bad: list[str]) -> Iterator[JobRecord]:
    """The source's records with ids and overrides; a bad override is skipped (listed in `bad`) or raises."""
    seen: set[int | str] = set()
    for record in source.records():
        try:
            record_id = _record_id(record)
            if record_id in seen:
                raise ValueError(f"duplicate id {record_id!r} (ids must be unique to resume)")
            circuit, multiplier = _override(record, circuits)
        except (TypeError, ValueError) as error:
            if not source.skip_bad:
                raise CNAError(f"{source.spec}:{record.line}: {error} (fix the record, or pass --skip-bad / "
                               "skip_bad=True)") from None
            bad.append(f"{source.spec}:{record.line}: {error}")
            continue
        seen.add(record_id)
        yield JobRecord(record_id, record.prompt, circuit, multiplier)


def record_seed(seed: int, record_id: int | str) -> int:
    """A per-record sampling seed from the job seed and the record id (independent of batch composition)."""
    digest = hashlib.sha256(f"{seed}:{json.dumps(record_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _requests(records: Iterator[JobRecord], tokenizer, circuits: JobCircuits, window: int,
              generation: GenerationSettings, model: nn.Module, source: PromptSource, bad: list[str]
              ) -> Iterator[Request]:
    """Requests in windows of `window` records, each window sorted by prompt length (less padding per prefill).

    A record whose prompt and answer do not fit the model's context is refused (skipped and listed with skip_bad)."""
    for chunk in windows(records, window):
        encoded = encode_prompts(tokenizer, [record.prompt for record in chunk], generation.chat_template)
        for index in sorted(range(len(chunk)), key=lambda i: len(encoded[i])):
            record = chunk[index]
            overflow = generation_overflow(model, len(encoded[index]), generation.max_new_tokens)
            if overflow:
                if not source.skip_bad:
                    raise CNAError(f"{source.spec}: record {record.id!r}: {overflow} (or pass --skip-bad / "
                                   "skip_bad=True)")
                bad.append(f"{source.spec}: record {record.id!r}: {overflow}")
                continue
            generator = (torch.Generator().manual_seed(record_seed(generation.seed or 0, record.id))
                         if generation.do_sample else None)
            yield Request(record, encoded[index], circuits.table_row(record), generator)


def _eos_ids(model: nn.Module, tokenizer) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, (list, tuple)) else [configured])
    ids.add(tokenizer.eos_token_id)
    return {token for token in ids if token is not None}


def job_settings(engine: dict, source: PromptSource, circuits: JobCircuits, options: dict) -> dict:
    """The sidecar's settings: what generates (`engine`), from which prompts and circuits, with which options;
    everything that decides the outputs (sampling parameters only when sampling)."""
    settings = {**engine, "prompts": source.spec, "prompts_sha256": source.content_hash(),
                "skip_bad": source.skip_bad, "circuits": circuits.digests(), "default_circuit": circuits.default,
                "multiplier": circuits.multiplier, **options}
    if not options["do_sample"]:
        for key in ("temperature", "top_p", "seed"):
            settings.pop(key)
    return settings


def _settings(model: nn.Module, source: PromptSource, circuits: JobCircuits, generation: GenerationSettings) -> dict:
    """Everything that decides the outputs (not batch size or window, which only change speed)."""
    options = {key: value for key, value in dataclasses.asdict(generation).items() if key != "batch_size"}
    options["seed"] = generation.seed or 0  # what the records' generators are seeded from
    config = {key: value for key, value in model.config.to_dict().items()
              if key not in ("transformers_version", "_name_or_path")}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]
    engine = {"model": getattr(model, "name_or_path", ""), "model_config": config_hash,
              "dtype": str(next(model.parameters()).dtype)}
    return job_settings(engine, source, circuits, options)


def _line(completion: Completion, tokenizer) -> dict:
    record: JobRecord = completion.request.handle
    return {"id": record.id, "prompt": record.prompt,
            "output": tokenizer.decode(completion.tokens, skip_special_tokens=True).strip(),
            "circuit": record.circuit, "multiplier": record.multiplier, "finish_reason": completion.finish_reason,
            "prompt_tokens": len(completion.request.token_ids), "output_tokens": len(completion.tokens)}


def _model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the model computes in (the first floating-point parameter's)."""
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def _not_done(records: Iterator[JobRecord], output: JobOutput) -> Iterator[JobRecord]:
    """The records not written yet; one written with another prompt under its id means the file is not this job's."""
    for record in records:
        written = output.done.get(record.id)
        if written is None:
            yield record
        elif written[1] != record.prompt:
            raise CNAError(f"{output.path}:{written[0]}: record id {record.id!r} holds another prompt than the input "
                           "record of that id: the results file was edited or belongs to another job. Remove the line, "
                           "or choose another --out")


def open_job_source(prompts: str | os.PathLike | PromptSource, skip_bad: bool) -> PromptSource:
    return prompts if isinstance(prompts, PromptSource) else PromptSource(prompts, skip_bad=skip_bad)


def generate_to_file(model: nn.Module, tokenizer, prompts: str | os.PathLike | PromptSource, out: str | os.PathLike,
                     *, circuits: Circuit | Mapping[str, Circuit] | None = None, multiplier: float = 0.0,
                     generation: GenerationSettings | None = None, skip_bad: bool = False, window: int = 1024,
                     progress: bool = True, **options: Any) -> JobSummary:
    """Generate a completion for every record of `prompts` into the JSONL file `out`, resuming a killed run.

    prompts: a prompt file or dataset spec (see PromptSource) or a PromptSource. A jsonl record may
    carry an `id` (else its line number is its id), a `circuit` (a name in `circuits`) and a `multiplier`.
    circuits: one Circuit, or {name: Circuit} (the first is the default), or None for no steering.
    generation / options: how answers are generated (a GenerationSettings, or its fields as keywords:
        max_new_tokens, batch_size, do_sample, temperature, top_p, seed, chat_template, positions).
    Records are read lazily, sorted by length within windows of `window`, and generated by continuous
    batching (see cna_fast.jobs.continuous). Sampling draws each record's tokens from its own generator seeded
    by (seed, id), so a record's output does not depend on the batch it ran in.
    """
    from tqdm.auto import tqdm

    generation, = with_options(options, generation or GenerationSettings())
    source = open_job_source(prompts, skip_bad)
    circuits = JobCircuits(circuits, as_multiplier(multiplier), _model_dtype(model))
    for named in circuits.named.values():
        named.validate(model)
    positive_int(window, "window")
    batcher = ContinuousBatcher(model, circuits.distinct, generation=generation, eos_ids=_eos_ids(model, tokenizer),
                                pad_id=pad_token_id(tokenizer))
    output = JobOutput(out, _settings(model, source, circuits, generation))
    summary, bad, started = JobSummary(resumed=len(output.done)), [], time.monotonic()
    try:
        records = _not_done(job_records(source, circuits, bad), output)
        requests = _requests(records, tokenizer, circuits, window, generation, model, source, bad)
        with tqdm(desc="generate", unit="rec", disable=not progress) as bar:
            for completion in batcher.run(requests):
                output.write(_line(completion, tokenizer))
                summary.written += 1
                summary.new_tokens += len(completion.tokens)
                bar.update(1)
                bar.set_postfix_str(f"{summary.new_tokens / (time.monotonic() - started):.1f} tok/s", refresh=False)
    finally:
        output.close()
    summary.bad = [f"{source.spec}:{record.line}: {record.reason}" for record in source.bad] + bad
    summary.seconds = time.monotonic() - started
    return summary
