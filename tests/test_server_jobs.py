"""The batch job on a server (cna_fast.jobs.server), against small stand-in servers (http.server).

The stand-ins answer the few endpoints the client uses, in the shapes llama-server
(tools/server/server-task.cpp, server-context.cpp) and vLLM's OpenAI server give, and record every
request, so the tests check what is sent: the tokens the hook path would see, the lora scale of each
record, vLLM's module per record. tests/test_llama_server.py runs the same client against a real
llama-server.
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from gguf import GGUFWriter

from cna_fast import CNAError
from cna_fast.jobs import server as server_jobs
from cna_fast.batching import encode_prompts
from cna_fast.circuit import Circuit
from cna_fast.jobs.server import ServerUnavailable, generate_on_server


def circuit(layers, neurons) -> Circuit:
    values = np.ones(len(layers))
    return Circuit(layers=layers, neurons=neurons, scores=values, deltas=values, mean_positive=values,
                   mean_negative=values, std_positive=values, std_negative=values, meta={})


FRENCH, OTHER = circuit([1, 2], [5, 9]), circuit([0], [3])


def adapter_file(path, circ: Circuit, multiplier: float):
    """A GGUF holding only the cna_fast provenance keys the client reads."""
    writer = GGUFWriter(path, arch="llama")
    writer.add_string("general.type", "adapter")
    writer.add_string("cna_fast.format", "gguf-lora")
    writer.add_float64("cna_fast.multiplier", multiplier)
    writer.add_array("cna_fast.circuit.layers", circ.layers.tolist())
    writer.add_array("cna_fast.circuit.neurons", circ.neurons.tolist())
    writer.add_tensor("x.lora_a", np.zeros((1, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


class Stand_in:
    """A threaded HTTP server whose behavior the test sets: routes, failures, recorded requests."""

    def __init__(self, routes) -> None:
        self.routes, self.requests, self.fail_next, self.down = routes, [], 0, False
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, body):
                if owner.down:
                    self.send_response(503)
                    self.end_headers()
                    return
                if body is not None and owner.fail_next > 0:
                    owner.fail_next -= 1
                    self.send_response(500)
                    self.end_headers()
                    return
                route = owner.routes.get(self.path)
                if route is None:
                    self.send_response(404)
                    self.end_headers()
                    self.wfile.write(b'{"error": "not found"}')
                    return
                if body is not None:
                    owner.requests.append(body)
                data = json.dumps(route(body)).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                self._answer(None)

            def do_POST(self):
                self._answer(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(server_jobs, "RETRIES", 2)
    monkeypatch.setattr(server_jobs, "BACKOFF_SECONDS", 0.01)


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    rows = [{"id": i, "prompt": f"question {i}", "circuit": "french" if i % 3 else "other",
             "multiplier": [0.0, 0.5, 1.0, -1.0][i % 4]} for i in range(12)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path, rows


def llama_stand_in(tmp_path, tokenizer):
    files = [adapter_file(tmp_path / "french.gguf", FRENCH, 0.0), adapter_file(tmp_path / "other.gguf", OTHER, 3.0)]

    def completion(body):
        return {"tokens": tokenizer("ok", add_special_tokens=False)["input_ids"], "stop_type": "eos",
                "content": "ok"}

    return Stand_in({"/props": lambda _: {"model_path": "/models/base.Q4_1.gguf"},
                     "/lora-adapters": lambda _: [{"id": i, "path": p, "scale": 0.0} for i, p in enumerate(files)],
                     "/completion": completion})


def read_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_llama_server_job_sends_hook_tokens_and_lora_scales(tmp_path, tokenizer, prompts):
    path, rows = prompts
    server = llama_stand_in(tmp_path, tokenizer)
    try:
        out = tmp_path / "out.jsonl"
        summary = generate_on_server(server.url, tokenizer, path, out, circuits={"french": FRENCH, "other": OTHER},
                                     max_new_tokens=5, concurrency=3, progress=False)
    finally:
        server.close()
    assert summary.written == 12 and summary.new_tokens == 12 * len(tokenizer("ok", add_special_tokens=False)[
        "input_ids"])
    lines = read_lines(out)
    assert sorted(line["id"] for line in lines) == list(range(12))
    assert all(line["output"] == "ok" and line["finish_reason"] == "stop" for line in lines)
    encoded = encode_prompts(tokenizer, [row["prompt"] for row in rows])
    by_prompt = {tuple(request["prompt"]): request for request in server.requests}
    for row, tokens in zip(rows, encoded):
        request = by_prompt[tuple(tokens)]  # the very tokens the hook path sees
        adapter_multiplier = 0.0 if row["circuit"] == "french" else 3.0
        wanted = {0: 0.0, 1: 0.0}
        if row["multiplier"] != 1.0:
            wanted[0 if row["circuit"] == "french" else 1] = (row["multiplier"] - 1) / (adapter_multiplier - 1)
        assert {entry["id"]: entry["scale"] for entry in request["lora"]} == wanted
        assert request["temperature"] == 0.0 and request["n_predict"] == 5
    sidecar = json.loads((tmp_path / "out.jsonl.job.json").read_text())["settings"]
    assert sidecar["backend"] == "llama-server" and sidecar["served_model"] == "base.Q4_1.gguf"


def test_retries_then_a_dead_server_loses_nothing_and_resumes(tmp_path, tokenizer, prompts):
    path, _ = prompts
    server = llama_stand_in(tmp_path, tokenizer)
    out = tmp_path / "out.jsonl"
    circuits = {"french": FRENCH, "other": OTHER}
    try:
        server.fail_next = 2  # two 500s: retried
        original = server.routes["/completion"]
        count = {"n": 0}

        def dies_after_five(body):
            count["n"] += 1
            if count["n"] >= 5:
                server.down = True
            return original(body)

        server.routes["/completion"] = dies_after_five
        with pytest.raises(ServerUnavailable, match="rerun"):
            generate_on_server(server.url, tokenizer, path, out, circuits=circuits, max_new_tokens=5, concurrency=2,
                               progress=False)
        first = read_lines(out)
        assert 1 <= len(first) < 12 and len({line["id"] for line in first}) == len(first)
        server.down = False
        server.routes["/completion"] = original
        summary = generate_on_server(server.url, tokenizer, path, out, circuits=circuits, max_new_tokens=5,
                                     concurrency=2, progress=False)
    finally:
        server.close()
    assert summary.resumed == len(first) and summary.written == 12 - len(first)
    assert sorted(line["id"] for line in read_lines(out)) == list(range(12))


def test_unknown_circuit_is_refused(tmp_path, tokenizer, prompts):
    path, _ = prompts
    server = llama_stand_in(tmp_path, tokenizer)
    try:
        with pytest.raises(CNAError, match="no adapter served"):
            generate_on_server(server.url, tokenizer, path, tmp_path / "out.jsonl",
                               circuits={"french": FRENCH, "third": circuit([4], [4])}, progress=False)
    finally:
        server.close()


def test_vllm_job_picks_the_module_per_record(tmp_path, tokenizer, prompts):
    path, _ = prompts
    models = {"data": [{"id": "base", "root": "base", "parent": None},
                       {"id": "french@0", "root": "/adapters/french", "parent": "base"},
                       {"id": "other@-1", "root": "/adapters/other", "parent": "base"}]}
    server = Stand_in({"/v1/models": lambda _: models,
                       "/v1/completions": lambda body: {"choices": [{"text": " fine", "finish_reason": "length",
                                                                     "token_ids": None}]}})
    try:
        out = tmp_path / "out.jsonl"
        with pytest.raises(CNAError, match="record 0: no LoRA module 'other@0'"):
            generate_on_server(server.url, tokenizer, path, out, circuits={"french": FRENCH, "other": OTHER},
                               progress=False)
        summary = generate_on_server(server.url, tokenizer, path, tmp_path / "skip.jsonl", skip_bad=True,
                                     circuits={"french": FRENCH, "other": OTHER}, progress=False)
    finally:
        server.close()
    served = {0.0: "french@0", 1.0: "base", -1.0: "other@-1"}
    multipliers = [0.0, 0.5, 1.0, -1.0]
    expected = [i for i in range(12) if multipliers[i % 4] == 1.0 or (multipliers[i % 4] == 0.0 and i % 3)
                or (multipliers[i % 4] == -1.0 and not i % 3)]
    lines = read_lines(tmp_path / "skip.jsonl")
    assert sorted(line["id"] for line in lines) == expected and summary.written == len(expected)
    assert len(summary.bad) == 12 - len(expected)
    models_sent = sorted(request["model"] for request in server.requests[-len(expected):])
    assert set(models_sent) <= set(served.values()) and all(line["output"] == "fine" for line in lines)
