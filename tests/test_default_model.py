"""Integration tests on the embedded default model (SmolLM2-135M-Instruct)."""
import torch

import cna_fast
from cna_fast.prompts import bundled_prompts
from tests.naive_reference import naive_discover


def test_default_model_loads_with_expected_architecture(default_model):
    model, tokenizer = default_model
    adapter = cna_fast.get_adapter(model)
    architecture = adapter.architecture()
    assert {key: architecture[key] for key in ("model_type", "num_layers", "d_ff", "d_model")} == {
        "model_type": "llama", "num_layers": 30, "d_ff": 1536, "d_model": 576}
    assert architecture["weights"]["dtype"] == "float32"  # the content sample that tells fine-tunes apart
    assert adapter.num_neurons == 46_080
    assert tokenizer.chat_template and tokenizer.pad_token_id is not None


def test_discovery_matches_naive_reference(default_model):
    """Batched, prefix-cached, early-stopped discovery equals one-prompt-at-a-time full forwards."""
    model, tokenizer = default_model
    positive = bundled_prompts("french_questions")[:24]
    negative = bundled_prompts("english_questions")[:24]
    circuit = cna_fast.discover(model, tokenizer, positive, negative, batch_size=8, progress=False)
    assert len(circuit) == 46  # 0.1% of 46,080 neurons
    expected, delta = naive_discover(model, tokenizer, positive, negative, top_k=len(circuit))
    found = list(zip(circuit.layers.tolist(), circuit.neurons.tolist()))
    assert set(found) == set(expected)
    naive_deltas = delta[circuit.layers, circuit.neurons]
    assert torch.allclose(circuit.deltas, naive_deltas, atol=1e-4, rtol=0)
    assert torch.equal(circuit.scores, circuit.deltas)


def test_cna_demo_finds_language_neurons(tmp_path, capsys):
    """`cna demo` runs discovery on the bundled French/English questions and saves the circuit."""
    from cna_fast.circuit import Circuit
    from cna_fast.cli import main

    out = tmp_path / "french.safetensors"
    assert main(["demo", "--quiet", "--out", str(out), "--held-out", "4"]) == 0
    text = capsys.readouterr().out
    assert "circuit: 46 neurons of SmolLM2-135M-Instruct" in text
    assert "circuit ablated (x0)" in text and "answers in French: baseline" in text
    circuit = Circuit.load(out)
    assert circuit.meta["n_positive"] == 160 and circuit.meta["n_negative"] == 160
    # French and English questions separate strongly: the top neuron's means are far apart.
    assert abs(float(circuit.deltas[0])) > 2 * float(max(circuit.std_positive[0], circuit.std_negative[0]))


def test_ablating_french_circuit_turns_answers_english(default_model):
    """The issue's story: ablate the French-vs-English circuit and held-out French questions get English answers."""
    from cna_fast.evaluation import language_rate
    from cna_fast.steering import generate

    model, tokenizer = default_model
    circuit = cna_fast.discover(model, tokenizer, bundled_prompts("french_questions"),
                                bundled_prompts("english_questions"), progress=False)
    held_out = bundled_prompts("french_heldout")[:16]
    multipliers = torch.tensor([[1.0]] * len(held_out) + [[0.0]] * len(held_out))
    texts = generate(model, tokenizer, held_out + held_out, circuits=circuit, multipliers=multipliers,
                     max_new_tokens=32, batch_size=32, progress=False)
    baseline, ablated = texts[:16], texts[16:]
    assert language_rate(ablated, "en") >= language_rate(baseline, "en") + 0.3
    assert language_rate(ablated, "fr") <= language_rate(baseline, "fr") - 0.3
