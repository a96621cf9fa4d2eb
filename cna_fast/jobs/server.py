"""The batch job on a server: records sent to llama-server or vLLM instead of our own engine.

Same input formats, records, sidecar and resume as `generate_to_file` (jobs/job.py, jobs/output.py);
only the generation moves. Each prompt is formatted and tokenized here exactly as the hook path
does (`encode_prompts`: the Hugging Face chat template) and sent as token ids, so the server sees
the tokens discovery saw (no second BOS, no server-side chat template); the answer comes back as
token ids and is decoded here as the hook path decodes it.

- llama-server (`--lora-scaled steer.gguf:0`, so a request without `lora` is unsteered): the job's
  circuits are matched to the server's adapters (`GET /lora-adapters`) by the cna_fast provenance in each adapter file
  (circuit neurons and export multiplier m_a, read from the path the server reports). A record at
  multiplier m gets `"lora": [{"id": i, "scale": (m - 1) / (m_a - 1)}]` and every other adapter at 0.
- vLLM (`--enable-lora --lora-modules NAME@M=folder`): a record's `model` is the LoRA module named
  `CIRCUIT@M` for its circuit and multiplier (names from `GET /v1/models`); multiplier 1 is the base
  model; a multiplier no loaded module serves is a bad record.

HTTP is the standard library's (urllib), `concurrency` requests in flight on a thread pool, retried
with exponential backoff on connection errors, timeouts and 5xx answers. Results are written as they
arrive; if the server stays down, the job stops after the requests in flight, having lost nothing,
and a rerun resumes.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from typing import Any
from dataclasses import dataclass
from pathlib import Path

from .job import JobRecord, JobSummary, JobCircuits, open_job_source, job_records, job_settings, record_seed
from .output import JobOutput
from ..batching import encode_prompts, windows
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError, positive_int
from ..prompts import PromptSource
from ..settings import with_options
from ..steering import GenerationSettings

RETRIES = 6
BACKOFF_SECONDS = 0.5
TIMEOUT_SECONDS = 600.0


class ServerUnavailable(CNAError):
    """The server did not answer (connection refused or reset, timeout, 5xx) after every retry."""


def _retryable(error: BaseException) -> bool:
    if isinstance(error, urllib.error.HTTPError):
        return error.code >= 500 or error.code == 429
    return isinstance(error, (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError,
                              http.client.HTTPException))


def request_json(url: str, payload: dict | None = None, *, retries: int | None = None, backoff: float | None = None,
                 timeout: float | None = None):
    """GET (payload None) or POST JSON to `url`; the decoded JSON answer. Retries with exponential backoff on
    connection errors, timeouts, 429 and 5xx; a 4xx answer raises CNAError at once with the server's message."""
    retries = RETRIES if retries is None else retries
    backoff = BACKOFF_SECONDS if backoff is None else backoff
    timeout = TIMEOUT_SECONDS if timeout is None else timeout
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers),
                                        timeout=timeout) as response:
                return json.loads(response.read())
        except Exception as error:  # noqa: BLE001 - sorted below: retried, reported, or re-raised
            if isinstance(error, urllib.error.HTTPError) and not _retryable(error):
                detail = error.read().decode(errors="replace")[:500]
                raise CNAError(f"{url} answered {error.code}: {detail}") from None
            if not _retryable(error):
                raise
            if attempt == retries:
                raise ServerUnavailable(f"{url} did not answer after {retries + 1} tries ({error}): start the server "
                                        "again, then rerun the same command to resume") from None
            time.sleep(backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def _neuron_set(layers, neurons, experts) -> frozenset:
    experts = list(experts) if experts is not None and len(experts) else [-1] * len(layers)
    return frozenset(zip((int(v) for v in layers), (int(v) for v in neurons), (int(v) for v in experts)))


def _circuit_set(circuit: Circuit) -> frozenset:
    return _neuron_set(circuit.layers.tolist(), circuit.neurons.tolist(),
                       circuit.experts.tolist() if circuit.experts is not None else None)


@dataclass(frozen=True)
class Adapter:
    """A served adapter: llama-server's id or vLLM's module name, the file, its export multiplier."""

    key: int | str
    path: str
    multiplier: float


class LlamaServerBackend:
    """llama-server: one GGUF LoRA per circuit, the strength chosen per request by the lora scale."""

    kind = "llama-server"

    def __init__(self, url: str, circuits: JobCircuits) -> None:
        self.url = url
        props = request_json(f"{url}/props", retries=2)
        self.model = Path(str(props.get("model_path", ""))).name
        adapters = request_json(f"{url}/lora-adapters", retries=2)
        self.all_ids = [int(entry["id"]) for entry in adapters]
        self.adapters: dict[str, Adapter] = {}
        served = []
        for entry in adapters:
            path = str(entry.get("path", ""))
            from ..export import read_provenance

            provenance = read_provenance(path) if os.path.isfile(path) else None
            if provenance is None:
                continue
            neurons = _neuron_set(provenance["circuit.layers"], provenance["circuit.neurons"],
                                  provenance.get("circuit.experts"))
            served.append((neurons, Adapter(int(entry["id"]), path, float(provenance["multiplier"]))))
        for name, circuit in circuits.named.items():
            match = next((adapter for neurons, adapter in served if neurons == _circuit_set(circuit)), None)
            if match is None:
                files = ", ".join(Path(str(entry.get("path", ""))).name for entry in adapters) or "none"
                raise CNAError(f"no adapter served by {url} holds circuit {name!r} (adapters: {files}; an adapter is "
                               "recognized by the cna_fast keys of its file, which must be readable here): export "
                               "it with `cna export --format gguf-lora` and start llama-server with "
                               "--lora-scaled FILE:0 --cache-ram 0")
            self.adapters[name] = match

    def describe(self) -> dict:
        return {"backend": self.kind, "served_model": self.model,
                "adapters": {name: {"file": Path(adapter.path).name, "multiplier": adapter.multiplier}
                             for name, adapter in self.adapters.items()}}

    def check(self, record: JobRecord) -> None:
        """Every finite multiplier is served (lora scale (m - 1) / (m_a - 1))."""

    def group(self, record: JobRecord) -> tuple:
        return (record.circuit or "", record.multiplier if record.multiplier is not None else 1.0)

    def lora(self, record: JobRecord) -> list[dict]:
        scales = dict.fromkeys(self.all_ids, 0.0)
        if record.circuit is not None and record.multiplier != 1.0:
            adapter = self.adapters[record.circuit]
            scales[adapter.key] = (record.multiplier - 1.0) / (adapter.multiplier - 1.0)
        return [{"id": key, "scale": scale} for key, scale in scales.items()]

    def send(self, record: JobRecord, token_ids: list[int], options: dict) -> tuple[list[int], str]:
        body = {"prompt": token_ids, "n_predict": options["max_new_tokens"], "cache_prompt": True,
                "return_tokens": True, "stream": False, "lora": self.lora(record)}
        if options["do_sample"]:
            body.update(temperature=options["temperature"], top_p=options["top_p"], top_k=0, min_p=0.0,
                        seed=record_seed(options["seed"], record.id) & 0xFFFFFFFF)
        else:
            body.update(temperature=0.0, top_k=1)  # temperature <= 0: argmax (llama-sampler.cpp)
        body.update(repeat_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0, dry_multiplier=0.0)
        answer = request_json(f"{self.url}/completion", body)
        tokens = [int(token) for token in answer.get("tokens") or []]
        return tokens, "stop" if answer.get("stop_type") in ("eos", "word") else "length"


def _adapter_name(circuit: str, multiplier: float) -> str:
    return f"{circuit}@{multiplier:g}"


class VLLMBackend:
    """vLLM's OpenAI server: one LoRA module per (circuit, multiplier), named CIRCUIT@M; records pick it by `model`."""

    kind = "vllm"

    def __init__(self, url: str, circuits: JobCircuits) -> None:
        self.url = url
        models = request_json(f"{url}/v1/models", retries=2).get("data", [])
        bases = [entry["id"] for entry in models if not entry.get("parent")]
        if not bases:
            raise CNAError(f"{url}/v1/models lists no base model")
        self.model = bases[0]
        self.modules = {entry["id"]: str(entry.get("root", "")) for entry in models if entry.get("parent")}
        self.circuits = circuits

    def describe(self) -> dict:
        return {"backend": self.kind, "served_model": self.model, "adapters": sorted(self.modules)}

    def check(self, record: JobRecord) -> None:
        if record.circuit is None or record.multiplier == 1.0:
            return
        name = _adapter_name(record.circuit, record.multiplier)
        if name not in self.modules:
            raise ValueError(f"no LoRA module {name!r} is loaded for circuit {record.circuit!r} at multiplier "
                             f"{record.multiplier:g} (served: {', '.join(sorted(self.modules)) or 'none'}): export it "
                             f"(cna export --format lora --multiplier {record.multiplier:g}) and serve it as "
                             f"--lora-modules {name}=FOLDER")

    def group(self, record: JobRecord) -> tuple:
        return (record.circuit or "", record.multiplier if record.multiplier is not None else 1.0)

    def send(self, record: JobRecord, token_ids: list[int], options: dict) -> tuple[list[int] | str, str]:
        model = self.model
        if record.circuit is not None and record.multiplier != 1.0:
            model = _adapter_name(record.circuit, record.multiplier)
        body = {"model": model, "prompt": token_ids, "max_tokens": options["max_new_tokens"],
                "return_token_ids": True, "skip_special_tokens": True}
        if options["do_sample"]:
            body.update(temperature=options["temperature"], top_p=options["top_p"],
                        seed=record_seed(options["seed"], record.id) & 0x7FFFFFFF)
        else:
            body.update(temperature=0.0)
        choice = request_json(f"{self.url}/v1/completions", body)["choices"][0]
        tokens = choice.get("token_ids")
        finish = "stop" if choice.get("finish_reason") == "stop" else "length"
        return ([int(token) for token in tokens] if tokens is not None else str(choice.get("text", ""))), finish


def connect(url: str, circuits: JobCircuits):
    """The backend behind `url`: llama-server when it answers /lora-adapters, else vLLM (/v1/models)."""
    url = url.rstrip("/")
    try:
        request_json(f"{url}/lora-adapters", retries=2)
    except ServerUnavailable:
        raise
    except CNAError:
        return VLLMBackend(url, circuits)
    return LlamaServerBackend(url, circuits)


def load_tokenizer(model: str | os.PathLike | None):
    """The tokenizer the hook path uses for `model` (the embedded default when None), without the weights."""
    from transformers import AutoTokenizer

    from ..models import default_model_dir
    from ..models.gguf_files import converted_dir, looks_like_gguf

    if model is None:
        return AutoTokenizer.from_pretrained(default_model_dir())
    if looks_like_gguf(model):
        return AutoTokenizer.from_pretrained(converted_dir(model))
    return AutoTokenizer.from_pretrained(str(model))


def _checked(records: Iterator[JobRecord], backend, source: PromptSource, bad: list[str]) -> Iterator[JobRecord]:
    for record in records:
        try:
            backend.check(record)
        except ValueError as error:
            if not source.skip_bad:
                raise CNAError(f"{source.spec}: record {record.id!r}: {error} (or pass --skip-bad)") from None
            bad.append(f"{source.spec}: record {record.id!r}: {error}")
            continue
        yield record


def _ordered(records: Iterator[JobRecord], tokenizer, chat_template, window: int, backend):
    """(record, token ids), grouped by lora setting within windows (llama-server batches equal settings only)."""
    for chunk in windows(records, window):
        encoded = encode_prompts(tokenizer, [record.prompt for record in chunk], chat_template)
        for index in sorted(range(len(chunk)), key=lambda i: (backend.group(chunk[i]), len(encoded[i]))):
            yield chunk[index], encoded[index]


def _settings(backend, tokenizer, source: PromptSource, circuits: JobCircuits, options: dict) -> dict:
    vocab = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]
    template = hashlib.sha256(str(getattr(tokenizer, "chat_template", "")).encode()).hexdigest()[:16]
    engine = {**backend.describe(), "tokenizer": vocab, "chat_template_text": template}
    return job_settings(engine, source, circuits, options)


def _run_requests(work, backend, tokenizer, options: dict, output: JobOutput, summary: JobSummary,
                  concurrency: int, progress: bool) -> BaseException | None:
    """Send `work` with `concurrency` requests in flight, writing answers as they come; the first failure, if any
    (after it no request is sent, and the answers of those in flight are still written)."""
    from tqdm.auto import tqdm

    failure: BaseException | None = None
    pending: dict[concurrent.futures.Future, tuple[JobRecord, list[int]]] = {}
    exhausted = False
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool, \
            tqdm(desc="generate", unit="rec", disable=not progress) as bar:
        while pending or (not exhausted and failure is None):
            while not exhausted and failure is None and len(pending) < 2 * concurrency:
                item = next(work, None)
                if item is None:
                    exhausted = True
                    break
                pending[pool.submit(backend.send, item[0], item[1], options)] = item
            if not pending:
                break
            finished, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in finished:
                record, token_ids = pending.pop(future)
                try:
                    tokens, finish = future.result()
                except BaseException as error:  # keep what the other requests in flight bring back
                    failure = failure or error
                    continue
                text = tokenizer.decode(tokens, skip_special_tokens=True) if isinstance(tokens, list) else tokens
                output.write({"id": record.id, "prompt": record.prompt, "output": text.strip(),
                              "circuit": record.circuit, "multiplier": record.multiplier, "finish_reason": finish,
                              "prompt_tokens": len(token_ids),
                              "output_tokens": len(tokens) if isinstance(tokens, list) else None})
                summary.written += 1
                summary.new_tokens += len(tokens) if isinstance(tokens, list) else 0
                bar.update(1)
    return failure


def generate_on_server(url: str, tokenizer, prompts: str | os.PathLike | PromptSource, out: str | os.PathLike, *,
                       circuits: Circuit | Mapping[str, Circuit] | None = None, multiplier: float = 0.0,
                       generation: GenerationSettings | None = None, concurrency: int = 8, skip_bad: bool = False,
                       window: int = 1024, progress: bool = True, **options: Any) -> JobSummary:
    """`generate_to_file` with the generation done by the server at `url` (llama-server or vLLM).

    tokenizer: the model's Hugging Face tokenizer (load_tokenizer), which formats prompts as the hook path
    does. generation / options: as for generate_to_file (batch_size is the server's business; a server
    steers every token, so positions must be "all"). Records, sidecar and resume are the batch job's; see
    the module docstring for how circuits and multipliers reach each server. concurrency: requests in
    flight (give llama-server as many --parallel slots).
    """
    generation, = with_options(options, generation or GenerationSettings())
    positive_int(concurrency, "concurrency")
    positive_int(window, "window")
    if generation.positions != "all":
        raise CNAError(f"a server steers every token (the adapter is in the weights): "
                       f"positions={generation.positions!r} needs the in-process job (no --server)")
    source = open_job_source(prompts, skip_bad)
    circuits = JobCircuits(circuits, as_multiplier(multiplier))
    backend = connect(url, circuits)
    request_options = {"max_new_tokens": generation.max_new_tokens, "do_sample": generation.do_sample,
                       "temperature": generation.temperature, "top_p": generation.top_p,
                       "seed": generation.seed or 0, "chat_template": generation.chat_template}
    output = JobOutput(out, _settings(backend, tokenizer, source, circuits, request_options))
    summary, bad, started = JobSummary(resumed=len(output.done)), [], time.monotonic()
    try:
        records = (record for record in job_records(source, circuits, bad) if record.id not in output.done)
        work = _ordered(_checked(records, backend, source, bad), tokenizer, generation.chat_template, window, backend)
        failure = _run_requests(work, backend, tokenizer, request_options, output, summary, concurrency, progress)
    finally:
        output.close()
    if failure is not None:
        raise failure
    summary.bad = [f"{source.spec}:{record.line}: {record.reason}" for record in source.bad] + bad
    summary.seconds = time.monotonic() - started
    return summary


# ------------------------------------------------------------------------- a local llama-server (tests, benchmarks)

def llama_server_binary() -> Path | None:
    """The llama-server that scripts/build_llama_server.sh built (or $CNA_LLAMA_SERVER), None if there is none."""
    import subprocess

    given = os.environ.get("CNA_LLAMA_SERVER")
    if given:
        return Path(given) if os.access(given, os.X_OK) else None
    script = Path(__file__).resolve().parents[2] / "scripts" / "build_llama_server.sh"
    if not script.is_file():
        return None
    done = subprocess.run(["bash", str(script), "--print-path"], capture_output=True, text=True)
    path = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    return Path(path) if done.returncode == 0 and path else None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LlamaServer:
    """A llama-server child process on a free local port: `with LlamaServer(model, loras=[...]) as server:`.

    loras are loaded as --lora-scaled FILE:0 with --lora-init-without-apply: a request without a `lora` field
    gets scale 0 (this llama.cpp gives such a request the scales the adapters were loaded with, and
    `--lora FILE` loads at 1, whatever --lora-init-without-apply says), and with --cache-ram 0 (the host prompt
    cache records no lora scale, so a prompt cached under one scale could be reused under another; a slot's own
    cache is cleared when the lora list changes). `url` is set once
    /health answers; `stop()` kills it (as a crash would), `close()` ends it. repack=False passes
    --no-repack: the native (-march=native) build of this llama.cpp crashed (SIGSEGV at its first
    graph) with weights repacked into the CPU's AMX buffers on the machine this was written on.
    """

    def __init__(self, model: str | os.PathLike, *, loras=(), parallel: int = 4, context: int = 1024,
                 threads: int | None = None, binary: str | os.PathLike | None = None, port: int | None = None,
                 log: str | os.PathLike | None = None, repack: bool = False, extra=()) -> None:
        binary = binary or llama_server_binary()
        if binary is None:
            raise CNAError("llama-server is not built: run scripts/build_llama_server.sh")
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port),
                        "--parallel", str(parallel), "--ctx-size", str(context * parallel), "--no-webui",
                        *[arg for lora in loras for arg in ("--lora-scaled", f"{lora}:0")],
                        *(["--lora-init-without-apply", "--cache-ram", "0"] if loras else []),
                        *(["--threads", str(threads)] if threads else []), *([] if repack else ["--no-repack"]),
                        *map(str, extra)]
        self.log = log
        self.process = None

    def start(self, timeout: float = 120.0) -> LlamaServer:
        import subprocess

        output = open(self.log, "ab") if self.log else subprocess.DEVNULL  # noqa: SIM115 - kept open with the child
        self.process = subprocess.Popen(self.command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise CNAError(f"llama-server exited with code {self.process.returncode}: {' '.join(self.command)}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, socket.timeout, http.client.HTTPException):
                pass
            time.sleep(0.2)
        self.close()
        raise CNAError(f"llama-server did not become ready in {timeout:.0f} s")

    def stop(self) -> None:
        """Kill the server at once (SIGKILL), as a crash would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except Exception:  # noqa: BLE001 - a stuck server is killed
                self.stop()

    def __enter__(self) -> LlamaServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def complete(self, token_ids: list[int], max_new_tokens: int, lora: list[dict] | None = None) -> list[int]:
        """Greedy /completion of `token_ids`; the new token ids."""
        body = {"prompt": token_ids, "n_predict": max_new_tokens, "temperature": 0.0, "top_k": 1,
                "return_tokens": True, "cache_prompt": False, "repeat_penalty": 1.0}
        if lora is not None:
            body["lora"] = lora
        return [int(token) for token in request_json(f"{self.url}/completion", body)["tokens"]]


__all__ = ["Adapter", "LlamaServer", "LlamaServerBackend", "ServerUnavailable", "VLLMBackend", "connect",
           "generate_on_server", "llama_server_binary", "load_tokenizer", "request_json"]
