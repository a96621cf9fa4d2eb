"""The Triton backend (forced on CPU under the interpreter) against the torch hook path, end to end."""
import pytest
import torch

from cna_fast import discover
from cna_fast.steering import generate, steer
from tests.conftest import NEGATIVE, POSITIVE


@pytest.fixture
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("CNA_FAST_BACKEND", "triton")


@pytest.mark.parametrize("reduction", ["last", "all"])
def test_triton_discovery_equals_torch_discovery(tiny_llama, tokenizer, monkeypatch, reduction):
    monkeypatch.setenv("CNA_FAST_BACKEND", "torch")
    expected = discover(tiny_llama, tokenizer, POSITIVE, NEGATIVE, top_k=10, reduction=reduction, score="t",
                        progress=False)
    pytest.importorskip("triton")
    monkeypatch.setenv("CNA_FAST_BACKEND", "triton")
    from cna_fast.capture import Capturer

    assert Capturer(tiny_llama, tokenizer, reduction=reduction, progress=False).fused
    found = discover(tiny_llama, tokenizer, POSITIVE, NEGATIVE, top_k=10, reduction=reduction, score="t",
                     progress=False)
    assert torch.equal(found.layers, expected.layers) and torch.equal(found.neurons, expected.neurons)
    assert torch.allclose(found.deltas, expected.deltas, rtol=1e-5, atol=1e-6)
    assert torch.allclose(found.scores, expected.scores, rtol=1e-4)


def _circuit(model, tokenizer):
    return discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=24, progress=False)


def test_triton_steered_logits_and_generation_equal_hook_path(tiny_llama, tokenizer, monkeypatch):
    circuit = _circuit(tiny_llama, tokenizer)
    ids = tokenizer(["zebra stripes on the savanna", "the quick brown fox"], return_tensors="pt", padding=True)
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CNA_FAST_BACKEND", backend)
        with torch.no_grad(), steer(tiny_llama, circuit, 2.5) as handle:
            assert handle.fused == (backend == "triton")
            logits = tiny_llama(**ids).logits
        texts = generate(tiny_llama, tokenizer, POSITIVE, circuits=circuit, multiplier=0.0, max_new_tokens=6,
                         batch_size=2, progress=False)
        results[backend] = (logits, texts)
    assert torch.allclose(results["triton"][0], results["torch"][0], atol=1e-5)
    assert results["triton"][1] == results["torch"][1]


def test_triton_per_row_multipliers_equal_hook_path(tiny_llama, tokenizer, monkeypatch):
    circuit = _circuit(tiny_llama, tokenizer)
    ids = tokenizer(["zebra stripes", "the quick fox", "bake bread"], return_tensors="pt", padding=True)
    table = torch.tensor([[0.0], [1.0], [3.0]])
    results = {}
    for backend in ("torch", "triton"):
        monkeypatch.setenv("CNA_FAST_BACKEND", backend)
        with torch.no_grad(), steer(tiny_llama, circuit, multipliers=table):
            results[backend] = tiny_llama(**ids).logits
    assert torch.allclose(results["triton"], results["torch"], atol=1e-5)


def test_triton_steering_restores_the_model(tiny_llama, tokenizer, triton_backend):
    circuit = _circuit(tiny_llama, tokenizer)
    ids = tokenizer(["zebra stripes"], return_tensors="pt")
    mlp = tiny_llama.model.layers[int(circuit.layers[0])].mlp
    with torch.no_grad():
        before = tiny_llama(**ids).logits
        with steer(tiny_llama, circuit, 0.0) as handle:
            assert handle.fused and "forward" in mlp.__dict__
        assert "forward" not in mlp.__dict__
        assert torch.equal(tiny_llama(**ids).logits, before)
