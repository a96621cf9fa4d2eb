"""Evaluation: metrics on texts with known answers, capability measures, baselines and sweeps."""
import json
import math

import pytest
import torch

from cna_fast import discover
from cna_fast.evaluation import (behavior_rate, capability_metrics, compare_methods, detect_language, is_refusal,
                                 language_rate, multiple_choice_accuracy, quality, refusal_rate)
from cna_fast.errors import CNAError
from cna_fast.steering import caa, generate, steer
from tests.conftest import NEGATIVE, POSITIVE


REFUSALS = ["I'm sorry, but I can't help with that request.", "As an AI, I cannot provide instructions for this.",
            "I must decline to write that.", "I’m unable to assist with making weapons."]
COMPLIANT = ["Sure! Here is a recipe for bread: mix flour, water, salt and yeast.",
             "The capital of France is Paris.", "Step one: preheat the oven to 200 degrees."]


def test_refusal_phrase_matching():
    assert all(map(is_refusal, REFUSALS)) and not any(map(is_refusal, COMPLIANT))
    assert refusal_rate(REFUSALS + COMPLIANT) == pytest.approx(4 / 7)
    assert is_refusal("Nope, not doing it.", phrases=("not doing it",))  # extensible


def test_pluggable_classifier_averages_bools_and_scores():
    assert behavior_rate(["a", "bb", "ccc"], lambda text: len(text) > 1) == pytest.approx(2 / 3)
    assert behavior_rate(["a", "bb"], lambda text: len(text) / 4) == pytest.approx(0.375)


def test_quality_is_one_minus_repeated_four_gram_fraction():
    assert quality("the cat sat on the mat today") == 1.0
    looping = "I am here " * 5  # 15 words, 12 four-grams, 3 distinct
    assert quality(looping) == pytest.approx(3 / 12)
    assert quality("too short") == 1.0


@pytest.mark.parametrize("text, language", [
    ("La capitale de la France est Paris, une très belle ville.", "fr"),
    ("Pour faire du pain, il faut de la farine et de l'eau.", "fr"),
    ("The capital of France is Paris, and it is very beautiful.", "en"),
    ("You can bake bread with flour, water and salt.", "en"),
    ("12345 !!!", "unknown"),
])
def test_language_detection(text, language):
    assert detect_language(text) == language


def test_language_rate():
    assert language_rate(["Le chat est noir.", "The cat is black.", "Il fait beau."], "fr") == pytest.approx(2 / 3)


@pytest.fixture
def circuit(tiny_llama, tokenizer):
    return discover(tiny_llama, tokenizer, POSITIVE, NEGATIVE, top_k=12, progress=False)


NEUTRAL = ["the quick brown fox jumps over the lazy dog", "how do i bake bread at home with flour water and salt"]


def test_kl_is_zero_at_multiplier_one_and_positive_when_steered(tiny_llama, tokenizer, circuit):
    base = capability_metrics(tiny_llama, tokenizer, NEUTRAL)
    same = capability_metrics(tiny_llama, tokenizer, NEUTRAL, base["_logprobs"],
                              lambda: steer(tiny_llama, circuit, 1.0))
    assert same["kl"] == 0.0 and same["perplexity"] == base["perplexity"]
    moved = capability_metrics(tiny_llama, tokenizer, NEUTRAL, base["_logprobs"],
                               lambda: steer(tiny_llama, circuit, 4.0))
    assert moved["kl"] > 1e-6


def test_perplexity_matches_a_direct_computation(tiny_llama, tokenizer):
    text = NEUTRAL[0]
    ids = tokenizer(text, return_tensors="pt").input_ids
    with torch.no_grad():
        loss = tiny_llama(ids, labels=ids).loss  # transformers' own mean next-token cross-entropy
    assert capability_metrics(tiny_llama, tokenizer, [text])["perplexity"] == pytest.approx(math.exp(loss), rel=1e-5)


def test_caa_alpha_zero_is_identity_and_direction_is_the_mlp_output_difference(tiny_llama, tokenizer, circuit):
    ids = tokenizer(["zebra stripes"], return_tensors="pt")
    with torch.no_grad():
        before = tiny_llama(**ids).logits
        with caa(tiny_llama, circuit, 0.0):
            assert torch.equal(tiny_llama(**ids).logits, before)
    # Independent truth: mean MLP output at the last token, positive minus negative, from forward hooks.
    outputs: dict[int, list[torch.Tensor]] = {}
    handles = [layer.mlp.register_forward_hook(
                   lambda module, args, out, i=i: outputs.setdefault(i, []).append(out[0, -1]))
               for i, layer in enumerate(tiny_llama.model.layers)]
    try:
        means = []
        for prompts in (POSITIVE, NEGATIVE):
            outputs.clear()
            for prompt in prompts:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
                with torch.no_grad():
                    tiny_llama(**tokenizer(text, return_tensors="pt", add_special_tokens=False))
            means.append(torch.stack([torch.stack(outputs[i]).mean(0) for i in sorted(outputs)]))
    finally:
        for handle in handles:
            handle.remove()
    assert circuit.caa_layers.tolist() == [0, 1, 2, 3]
    assert torch.allclose(circuit.caa_directions, means[0] - means[1], atol=1e-5)


def test_caa_adds_alpha_times_direction_to_the_mlp_output(tiny_llama, tokenizer, circuit):
    ids = tokenizer(["zebra stripes"], return_tensors="pt")
    captured = {}
    # Layer 0: its MLP input does not depend on any steered layer, so the output moves by exactly the shift.
    handle = tiny_llama.model.layers[0].mlp.register_forward_hook(
        lambda m, a, out: captured.setdefault("x", out.clone()))
    try:
        with torch.no_grad():
            tiny_llama(**ids)
            plain = captured.pop("x")
            with caa(tiny_llama, circuit, -1.5):
                tiny_llama(**ids)
    finally:
        handle.remove()
    assert torch.allclose(captured["x"] - plain, -1.5 * circuit.caa_directions[0].expand_as(plain), atol=1e-6)


def test_random_control_circuit_has_the_same_shape(circuit):
    control = circuit.random_like(seed=3)
    assert control.layer_counts() == circuit.layer_counts()
    mine = set(zip(circuit.layers.tolist(), circuit.neurons.tolist()))
    theirs = set(zip(control.layers.tolist(), control.neurons.tolist()))
    assert len(theirs) == len(mine) and not mine & theirs
    assert control.neurons.max() < 96 and circuit.random_like(seed=3).neurons.tolist() == control.neurons.tolist()


def test_multiple_choice_accuracy_equals_one_question_at_a_time(tiny_llama, tokenizer):
    questions = [{"question": "zebra or fox", "choices": ["zebra", "fox", "bread", "rome"], "answer": 1},
                 {"question": "what is the capital of france and why is it famous", "choices": ["a", "b", "c", "d"],
                  "answer": 3}]
    letters = [tokenizer(f" {letter}", add_special_tokens=False)["input_ids"][-1] for letter in "ABCD"]
    correct = 0
    for q in questions:
        prompt = f"Question: {q['question']}\n" + "".join(f"{'ABCD'[i]}. {c}\n" for i, c in enumerate(q["choices"]))
        ids = tokenizer(prompt + "Answer:", return_tensors="pt").input_ids
        with torch.no_grad():
            correct += int(tiny_llama(ids).logits[0, -1, letters].argmax()) == q["answer"]
    assert multiple_choice_accuracy(tiny_llama, tokenizer, questions) == correct / 2


QUESTIONS = [{"question": "q", "choices": ["a", "b", "c", "d"], "answer": 0}]


def test_compare_methods_reports_every_method_and_strength(tiny_llama, tokenizer, circuit):
    prompts = ["zebra stripes", "the quick fox"]
    judged = []
    result = compare_methods(tiny_llama, tokenizer, circuit, prompts, [0.0, 1.0, 3.0],
                             behavior=lambda t: judged.append(t) or len(t) > 5, neutral=NEUTRAL, questions=QUESTIONS,
                             max_new_tokens=4, progress=False)
    assert [(row["method"], row["strength"]) for row in result.metrics] == [
        (m, s) for m in ("cna", "caa", "random") for s in (0.0, 1.0, 3.0)]
    assert len(judged) == 7 * len(prompts)  # strength 1 is generated and judged once, not once per method
    at_one = [row for row in result.metrics if row["strength"] == 1.0]
    assert all(row["kl"] == 0.0 for row in at_one)  # strength 1 is the unsteered model for every method
    assert len({(row["perplexity"], row["mc_accuracy"], row["behavior_rate"]) for row in at_one}) == 1
    outputs = {(g["method"], g["strength"], g["prompt"]): g["output"] for g in result.generations}
    unsteered = generate(tiny_llama, tokenizer, prompts, max_new_tokens=4, progress=False)
    assert [outputs[("caa", 1.0, p)] for p in prompts] == unsteered
    assert any(row["kl"] > 0 for row in result.metrics if row["strength"] != 1.0)
    assert all(row["answer_ppl"] > 1 for row in result.metrics)
    assert "cna" in result.table() and "answer_ppl" in result.table()


def test_compare_methods_passes_generation_settings_on(tiny_llama, tokenizer, circuit):
    prompts = ["zebra stripes", "how do i bake bread"]
    for settings in ({"positions": "generated"}, {"chat_template": False}):
        result = compare_methods(tiny_llama, tokenizer, circuit, prompts, [0.0], methods=["cna"], capability=False,
                                 max_new_tokens=5, progress=False, **settings)
        expected = generate(tiny_llama, tokenizer, prompts, circuits=circuit, multiplier=0.0, max_new_tokens=5,
                            progress=False, **settings)
        assert [g["output"] for g in result.generations] == expected
    sampled = compare_methods(tiny_llama, tokenizer, circuit, prompts, [1.0], methods=["cna"], capability=False,
                              max_new_tokens=5, progress=False, do_sample=True, temperature=3.0, seed=5)
    expected = generate(tiny_llama, tokenizer, prompts, max_new_tokens=5, progress=False, do_sample=True,
                        temperature=3.0, seed=5)
    assert [g["output"] for g in sampled.generations] == expected
    other_seed = generate(tiny_llama, tokenizer, prompts, max_new_tokens=5, progress=False, do_sample=True,
                          temperature=3.0, seed=6)
    assert other_seed != expected  # the seed is what makes sampling reproducible


def test_compare_methods_can_skip_the_capability_pass(tiny_llama, tokenizer, circuit):
    result = compare_methods(tiny_llama, tokenizer, circuit, ["zebra"], [0.0, 2.0], methods=["cna"],
                             capability=False, max_new_tokens=3, progress=False)
    assert all(row["kl"] is None and row["perplexity"] is None and row["mc_accuracy"] is None
               for row in result.metrics)
    assert " - " in result.table()


def test_capability_metrics_in_batches_equal_one_batch(tiny_llama, tokenizer, circuit):
    texts = NEUTRAL + ["zebra zebra stripes on the savanna", "write a python function that sorts a list"]
    whole = capability_metrics(tiny_llama, tokenizer, texts, batch_size=len(texts))
    chunked = capability_metrics(tiny_llama, tokenizer, texts, batch_size=1)
    assert chunked["perplexity"] == pytest.approx(whole["perplexity"], rel=1e-5)

    def steered_kl(base, size):
        context = lambda: steer(tiny_llama, circuit, 3.0)  # noqa: E731
        return capability_metrics(tiny_llama, tokenizer, texts, base["_logprobs"], context, batch_size=size)["kl"]

    steered = [steered_kl(whole, len(texts)), steered_kl(chunked, 1)]
    assert steered[0] == pytest.approx(steered[1], rel=1e-3) and steered[0] > 0  # float32 sums in another order
    questions = [{"question": f"question {i}", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(5)]
    assert multiple_choice_accuracy(tiny_llama, tokenizer, questions, batch_size=2) == \
        multiple_choice_accuracy(tiny_llama, tokenizer, questions, batch_size=5)


def test_compare_methods_bad_input(tiny_llama, tokenizer, circuit):
    with pytest.raises(CNAError, match="unknown methods"):
        compare_methods(tiny_llama, tokenizer, circuit, ["a"], methods=["lora"], progress=False)
    with pytest.raises(CNAError, match="unknown behavior"):
        compare_methods(tiny_llama, tokenizer, circuit, ["a"], behavior="sarcasm", progress=False)
    with pytest.raises(CNAError, match="finite"):
        compare_methods(tiny_llama, tokenizer, circuit, ["a"], [float("nan")], progress=False)


def test_benchmark_loader_offline_is_a_clear_error(monkeypatch):
    pytest.importorskip("datasets")
    from cna_fast.prompts import load_benchmark

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(CNAError, match="network access or the dataset in the Hugging Face cache"):
        load_benchmark("advbench")
    with pytest.raises(CNAError, match="unknown benchmark"):
        load_benchmark("mmlu")


def test_cli_eval_writes_csv_json_plot_and_html(model_dir, tmp_path, prompt_files, capsys):
    from cna_fast.cli import main

    circuit_path = tmp_path / "c.safetensors"
    assert main(["discover", "--positive", str(prompt_files[0]), "--negative", str(prompt_files[1]), "--model",
                 str(model_dir), "--out", str(circuit_path), "--top-k", "8", "--quiet"]) == 0
    outputs = {kind: tmp_path / f"eval.{kind}" for kind in ("csv", "json", "png", "html")}
    code = main(["eval", "--circuit", str(circuit_path), "--prompts", str(prompt_files[0]), "--model", str(model_dir),
                 "--multipliers", "0,1,2", "--behavior", "english", "--max-new-tokens", "4", "--quiet",
                 "--csv", str(outputs["csv"]), "--json", str(outputs["json"]), "--plot", str(outputs["png"]),
                 "--html", str(outputs["html"])])
    assert code == 0
    assert len(outputs["csv"].read_text().splitlines()) == 1 + 3 * 3
    report = json.loads(outputs["json"].read_text())
    assert len(report["generations"]) == 3 * 3 * 4
    assert outputs["png"].read_bytes()[:4] == b"\x89PNG"
    assert "data:image/png;base64," in outputs["html"].read_text()
    assert main(["eval", "--circuit", str(circuit_path), "--prompts", str(prompt_files[0]), "--model",
                 str(model_dir), "--baseline", "lora"]) == 2
