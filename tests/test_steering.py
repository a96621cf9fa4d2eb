"""Steering: hooks against hand-scaled down-projection weights, exact removal, per-row multipliers, positions,
generate batching and bad input."""
from __future__ import annotations

import copy
from typing import Callable, Sequence

import pytest
import torch
import transformers
from torch import nn

from cna_fast import get_adapter
from cna_fast.circuit import Circuit
from cna_fast.errors import CircuitMismatchError, CNAError
from cna_fast.models import cache_keyword, find_cache
from cna_fast.steering import generate, steer
from tests.tiny import DOWN_PATHS, assert_state_identical, build_tiny_model, snapshot

ARCHS = ("llama", "gpt2", "phi3", "gpt_neox")
D_FF = 96
N_LAYERS = 4
ATOL = 1e-5


PROMPTS = ["zebra", "what is the capital of france and why is it famous", "bread and salt",
           "the quick brown fox jumps", "explain photosynthesis to a child in simple words please"]


# ----------------------------------------------------------------------------------------------- helpers


def new_model(arch: str, vocab_size: int = 400, seed: int = 0) -> nn.Module:
    """A fresh tiny random-weight model (every test gets its own, so a leaked hook cannot spread)."""
    return build_tiny_model(arch, vocab_size=vocab_size, seed=seed)


def sharp_model(arch: str, vocab_size: int, gain: float = 8.0) -> nn.Module:
    """A tiny model whose matrices are scaled up: at the default init every prompt generates the same text,
    which would make order and steering checks on generations vacuous."""
    model = new_model(arch, vocab_size)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 2:
                parameter.mul_(gain)
    return model


def down_projections(model: nn.Module) -> list[nn.Module]:
    blocks, down = DOWN_PATHS[model.config.model_type]
    return [block.get_submodule(down) for block in model.get_submodule(blocks)]


def make_circuit(model: nn.Module, layers: Sequence[int], neurons: Sequence[int], architecture: dict | None = None
                 ) -> Circuit:
    """A circuit at the given positions, dummy statistics, the model's architecture in meta."""
    n = len(layers)
    values = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    meta = {"architecture": architecture if architecture is not None else get_adapter(model).architecture()}
    return Circuit(layers=list(layers), neurons=list(neurons), scores=values, deltas=values, mean_positive=values,
                   mean_negative=torch.zeros(n), std_positive=torch.ones(n), std_negative=torch.ones(n), meta=meta)


def factors_of(circuits: Sequence[Circuit], multipliers: Sequence[float]) -> dict[tuple[int, int], float]:
    """(layer, neuron) -> product of the multipliers of every circuit that contains it."""
    factors: dict[tuple[int, int], float] = {}
    for circuit, multiplier in zip(circuits, multipliers):
        for layer, neuron in zip(circuit.layers.tolist(), circuit.neurons.tolist()):
            factors[(layer, neuron)] = factors.get((layer, neuron), 1.0) * multiplier
    return factors


def hand_scaled(model: nn.Module, factors: dict[tuple[int, int], float]) -> nn.Module:
    """A deep copy whose down-projection weight columns (rows for GPT-2's Conv1D) are scaled by hand."""
    assert not any(down._forward_pre_hooks for down in down_projections(model)), "copy taken while steered"
    clone = copy.deepcopy(model)
    downs = down_projections(clone)
    with torch.no_grad():
        for (layer, neuron), factor in factors.items():
            weight = downs[layer].weight
            if clone.config.model_type == "gpt2":  # Conv1D stores [in, out]
                weight[neuron, :] *= factor
            else:  # nn.Linear stores [out, in]
                weight[:, neuron] *= factor
    return clone


def token_ids(rows: int, length: int, seed: int = 0, vocab_size: int = 400) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (rows, length), generator=generator)


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None) -> torch.Tensor:
    return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits


def hook_count(model: nn.Module) -> int:
    """Forward (pre-)hooks on all modules of the model."""
    return sum(len(module._forward_pre_hooks) + len(module._forward_hooks) for module in model.modules())


def assert_no_hooks(model: nn.Module) -> None:
    for down in down_projections(model):
        assert not down._forward_pre_hooks
    assert not model.base_model._forward_pre_hooks
    assert hook_count(model) == 0


def default_circuit(model: nn.Module) -> Circuit:
    """Neurons in three layers, including the first and last index of a layer."""
    return make_circuit(model, [0, 1, 1, 3, 3, 3], [5, 7, 90, 0, 95, 40])


def big_circuit(model: nn.Module, per_layer: int = 24) -> Circuit:
    """Many neurons in every layer, so that steering visibly changes greedy generations."""
    layers = [layer for layer in range(N_LAYERS) for _ in range(per_layer)]
    neurons = [(7 * i + 3 * layer) % D_FF for layer in range(N_LAYERS) for i in range(per_layer)]
    return make_circuit(model, layers, neurons)


# ------------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("arch", ARCHS)
def test_steered_logits_equal_hand_scaled_weights(arch: str) -> None:
    """For m in 0, 0.5, 2, -1: hooks give the logits of a model with its down-projection columns scaled by m."""
    model = new_model(arch)
    circuit = default_circuit(model)
    ids = token_ids(2, 9)
    plain = logits_of(model, ids)
    for multiplier in (0.0, 0.5, 2.0, -1.0):
        expected = logits_of(hand_scaled(model, factors_of([circuit], [multiplier])), ids)
        assert not torch.allclose(expected, plain, atol=1e-4), "the circuit must change the logits"
        with steer(model, circuit, multiplier):
            steered = logits_of(model, ids)
        torch.testing.assert_close(steered, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_exit_and_remove_restore_the_model_exactly(arch: str) -> None:
    """After the context exits or remove(): byte-identical state dict, identical logits, no hooks left."""
    model = new_model(arch)
    circuit = default_circuit(model)
    ids = token_ids(2, 7, seed=1)
    before = snapshot(model)
    plain = logits_of(model, ids)
    with steer(model, circuit, 0.0):
        assert not torch.equal(logits_of(model, ids), plain)
        assert len(down_projections(model)[1]._forward_pre_hooks) == 1
    assert_state_identical(model, before)
    assert torch.equal(logits_of(model, ids), plain)
    assert_no_hooks(model)

    handle = steer(model, circuit, 3.0, positions="prompt")  # also hooks the body to track the phase
    assert len(model.base_model._forward_pre_hooks) == 1
    logits_of(model, ids)
    handle.remove()
    handle.remove()  # a second remove is harmless
    assert_state_identical(model, before)
    assert torch.equal(logits_of(model, ids), plain)
    assert_no_hooks(model)
    with steer(model, circuit, 0.5):  # the circuit can be applied again after removal
        pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exception_inside_context_still_removes_hooks(arch: str) -> None:
    model = new_model(arch)
    with pytest.raises(RuntimeError, match="boom"):
        with steer(model, default_circuit(model), 0.0):
            raise RuntimeError("boom")
    assert_no_hooks(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_multiplier_one_is_identity(arch: str) -> None:
    model = new_model(arch)
    ids = token_ids(2, 8, seed=2)
    plain = logits_of(model, ids)
    with steer(model, default_circuit(model), 1.0):
        assert torch.equal(logits_of(model, ids), plain)
    with steer(model, default_circuit(model), multipliers=torch.ones(2, 1)):
        assert torch.equal(logits_of(model, ids), plain)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "phi3"])
def test_circuits_compose_with_product_on_overlap(arch: str) -> None:
    model = new_model(arch)
    a = make_circuit(model, [1, 1, 2, 0], [3, 10, 50, 95])
    b = make_circuit(model, [1, 2, 3], [10, 50, 7])  # (1, 10) and (2, 50) are in both
    ids = token_ids(2, 9, seed=3)
    factors = factors_of([a, b], [0.5, 3.0])
    assert factors[(1, 10)] == factors[(2, 50)] == 1.5
    expected = logits_of(hand_scaled(model, factors), ids)
    with steer(model, [a, b], multipliers=[0.5, 3.0]):
        steered = logits_of(model, ids)
    torch.testing.assert_close(steered, expected, atol=ATOL, rtol=0)
    wrong = logits_of(hand_scaled(model, {**factors, (1, 10): 3.0, (2, 50): 3.0}), ids)
    assert not torch.allclose(steered, wrong, atol=1e-4), "overlap must get the product, not the last factor"


# ------------------------------------------------------------------------------------- per-row multipliers


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
def test_per_row_multipliers_same_length_batch(arch: str) -> None:
    """A [B, n_circuits] table in one batch equals each row run alone with its own multipliers."""
    model = new_model(arch)
    a, b = default_circuit(model), make_circuit(model, [1, 2, 3], [7, 11, 95])
    table = torch.tensor([[0.0, 1.0], [0.5, 3.0], [2.0, -1.0]])
    ids = token_ids(3, 8, seed=4)
    with steer(model, [a, b], multipliers=table):
        batched = logits_of(model, ids)
    for row in range(3):
        with steer(model, [a, b], multipliers=table[row].tolist()):
            alone = logits_of(model, ids[row:row + 1])
        torch.testing.assert_close(batched[row:row + 1], alone, atol=ATOL, rtol=0)
        expected = logits_of(hand_scaled(model, factors_of([a, b], table[row].tolist())), ids[row:row + 1])
        torch.testing.assert_close(batched[row:row + 1], expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_per_row_multipliers_left_padded_batch(arch: str) -> None:
    """Left-padded rows of different lengths with an attention mask: real positions match separate runs."""
    model = new_model(arch)
    circuit = big_circuit(model, per_layer=6)
    lengths = [3, 9, 6]
    table = torch.tensor([[0.0], [2.0], [-1.0]])
    width = max(lengths)
    ids = torch.full((3, width), 2, dtype=torch.long)
    mask = torch.zeros((3, width), dtype=torch.long)
    rows = [token_ids(1, length, seed=10 + i)[0] for i, length in enumerate(lengths)]
    for i, row in enumerate(rows):
        ids[i, width - lengths[i]:] = row
        mask[i, width - lengths[i]:] = 1
    position_ids = (mask.cumsum(1) - 1).clamp_min(0)
    with steer(model, circuit, multipliers=table):
        batched = logits_of(model, ids, mask, position_ids)
    for i, row in enumerate(rows):
        with steer(model, circuit, table[i, 0].item()):
            alone = logits_of(model, row[None])
        torch.testing.assert_close(batched[i, width - lengths[i]:], alone[0], atol=ATOL, rtol=0)


def test_generate_per_prompt_multipliers_equal_separate_calls(tokenizer) -> None:
    model = sharp_model("llama", len(tokenizer))
    circuit = big_circuit(model)
    prompts = ["what is the capital of france", "how do i bake bread", "zebra stripes"]
    batched = generate(model, tokenizer, prompts, circuits=circuit, multipliers=[[0.0], [1.0], [2.0]],
                       max_new_tokens=8, batch_size=3, progress=False)
    separate = [generate(model, tokenizer, [prompt], circuits=circuit, multiplier=m, max_new_tokens=8,
                         progress=False)[0] for prompt, m in zip(prompts, (0.0, 1.0, 2.0))]
    assert batched == separate
    unsteered = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=1, progress=False)
    assert batched[1] == unsteered[1]  # multiplier 1 is no steering
    assert batched[0] != unsteered[0] or batched[2] != unsteered[2], "steering must change some generation"
    assert_no_hooks(model)


# ------------------------------------------------------------------------------------------- positions


def record_generation(model: nn.Module, circuit: Circuit, positions: str, prompt: torch.Tensor,
                      layer: int) -> list[torch.Tensor]:
    """Generate 3 tokens with the KV cache at multiplier 0; record the circuit neurons seen by `layer`'s down
    projection after steering (a hook registered after entering steer runs after its hook)."""
    neurons = circuit.neurons[circuit.layers == layer]
    seen: list[torch.Tensor] = []

    def record(module: nn.Module, args: tuple) -> None:
        seen.append(args[0][..., neurons].detach().clone())

    with steer(model, circuit, 0.0, positions=positions):
        handle = down_projections(model)[layer].register_forward_pre_hook(record)
        try:
            with torch.no_grad():
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3,
                               do_sample=False, use_cache=True, pad_token_id=2)
        finally:
            handle.remove()
    return seen


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox"])
@pytest.mark.parametrize("positions, prefill_zero, decode_zero",
                         [("prompt", True, False), ("generated", False, True), ("all", True, True)])
def test_positions_during_cached_generate(arch: str, positions: str, prefill_zero: bool, decode_zero: bool) -> None:
    model = new_model(arch)
    circuit = default_circuit(model)
    prompt = token_ids(1, 6, seed=5)
    seen = record_generation(model, circuit, positions, prompt, layer=3)
    assert len(seen) == 3  # prefill + 2 decode steps (the 3rd token needs no forward)
    prefill, decodes = seen[0], seen[1:]
    assert prefill.shape[1] == 6 and all(step.shape[1] == 1 for step in decodes)
    assert bool((prefill == 0).all()) == prefill_zero and bool((prefill != 0).all()) != prefill_zero
    for step in decodes:
        assert bool((step == 0).all()) == decode_zero and bool((step != 0).all()) != decode_zero
    assert_no_hooks(model)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_positions_prompt_without_generate_steers_plain_forward(arch: str) -> None:
    """A plain forward (no cache) is a prompt pass: "prompt" steers it, "generated" leaves it alone."""
    model = new_model(arch)
    circuit = default_circuit(model)
    ids = token_ids(2, 7, seed=6)
    plain = logits_of(model, ids)
    with steer(model, circuit, 0.0):
        everywhere = logits_of(model, ids)
    with steer(model, circuit, 0.0, positions="prompt"):
        assert torch.equal(logits_of(model, ids), everywhere)
    with steer(model, circuit, 0.0, positions="generated"):
        assert torch.equal(logits_of(model, ids), plain)


@pytest.mark.parametrize("arch, multiplier, positions, rows, seed", [
    ("llama", 2.0, "all", 2, 7), ("gpt2", 2.0, "all", 2, 7), ("llama", -2.0, "generated", 1, 8)])
def test_steered_generate_with_and_without_cache_agree(arch: str, multiplier: float, positions: str, rows: int,
                                                       seed: int) -> None:
    """Steering (all tokens, or only the generated ones) gives the same greedy ids with and without a KV cache."""
    model = sharp_model(arch, 400)
    circuit = big_circuit(model)
    prompt = token_ids(rows, 6, seed=seed)
    outputs = {}
    with steer(model, circuit, multiplier, positions=positions):
        for use_cache in (True, False):
            with torch.no_grad():
                outputs[use_cache] = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                                    max_new_tokens=6, do_sample=False, use_cache=use_cache,
                                                    pad_token_id=2)
    with torch.no_grad():
        unsteered = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6,
                                   do_sample=False, pad_token_id=2)
    assert not torch.equal(unsteered, outputs[True]), "steering must change the generation"
    assert torch.equal(outputs[True], outputs[False])


# --------------------------------------------------------------------------------------- generate helper


@torch.no_grad()
def reference_generate(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """Greedy completion of one prompt through the chat template, by plain transformers calls."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_sampling_is_reproducible_with_a_seed(tokenizer) -> None:
    model = sharp_model("llama", len(tokenizer))
    circuit = big_circuit(model)

    def sample(seed: int) -> list[str]:
        torch.manual_seed(seed)
        return generate(model, tokenizer, PROMPTS[:3], circuits=circuit, multiplier=0.5, do_sample=True,
                        max_new_tokens=8, batch_size=2, progress=False)

    first, second = sample(123), sample(123)
    assert first == second
    assert sample(7) != first  # the seed matters: this really samples
    assert_no_hooks(model)


@pytest.mark.parametrize("with_circuit", [False, True])
def test_generate_returns_texts_in_input_order(tokenizer, with_circuit: bool) -> None:
    model = sharp_model("llama", len(tokenizer))
    circuit = big_circuit(model) if with_circuit else None
    batched = generate(model, tokenizer, PROMPTS, circuits=circuit, multiplier=2.0, max_new_tokens=6, batch_size=2,
                       progress=False)
    alone = [generate(model, tokenizer, [prompt], circuits=circuit, multiplier=2.0, max_new_tokens=6,
                      progress=False)[0] for prompt in PROMPTS]
    assert batched == alone
    assert len(set(alone)) > 1, "different prompts should give different texts, or order is not tested"
    reference_model = hand_scaled(model, factors_of([circuit], [2.0])) if with_circuit else model
    assert alone == [reference_generate(reference_model, tokenizer, prompt, 6) for prompt in PROMPTS]
    assert_no_hooks(model)


def test_generate_restores_model_and_rejects_bad_tables(tokenizer) -> None:
    model = sharp_model("llama", len(tokenizer))
    circuit = default_circuit(model)
    before = snapshot(model)
    generate(model, tokenizer, PROMPTS[:2], circuits=circuit, multiplier=0.0, max_new_tokens=3, progress=False)
    assert_state_identical(model, before)
    assert_no_hooks(model)
    with pytest.raises(CNAError):
        generate(model, tokenizer, PROMPTS[:3], circuits=circuit, multipliers=[[0.0], [1.0]], progress=False)
    with pytest.raises(CNAError):
        generate(model, tokenizer, PROMPTS[:2], circuits=circuit, multiplier=float("nan"), progress=False)
    with pytest.raises(CNAError):
        generate(model, tokenizer, [], progress=False)
    assert_no_hooks(model)


# ------------------------------------------------------------------------------------------- bad input


def expect_error(model: nn.Module, build: Callable[[], object], error: type[Exception] = CNAError) -> None:
    """`build` raises `error`, and leaves no hook behind."""
    with pytest.raises(error):
        build()
    assert_no_hooks(model)


def test_circuit_that_does_not_fit_raises_mismatch() -> None:
    model = new_model("llama")
    architecture = get_adapter(model).architecture()
    expect_error(model, lambda: steer(model, make_circuit(model, [0, 1], [3, D_FF]), 0.0), CircuitMismatchError)
    expect_error(model, lambda: steer(model, make_circuit(model, [0, N_LAYERS], [3, 4]), 0.0), CircuitMismatchError)
    other = {"model_type": "llama", "num_layers": 30, "d_ff": 1536}  # SmolLM2-135M's architecture
    expect_error(model, lambda: steer(model, make_circuit(model, [0], [3], architecture=other), 0.0),
                 CircuitMismatchError)
    wider = {**architecture, "d_ff": 128}
    expect_error(model, lambda: steer(model, make_circuit(model, [0], [3], architecture=wider), 0.0),
                 CircuitMismatchError)
    good = default_circuit(model)
    expect_error(model, lambda: steer(model, [good, make_circuit(model, [2], [D_FF + 5])], multipliers=[0.0, 0.0]),
                 CircuitMismatchError)


def test_non_finite_multipliers_raise() -> None:
    model = new_model("llama")
    a, b = default_circuit(model), make_circuit(model, [2], [4])
    for bad in (float("nan"), float("inf"), -float("inf")):
        expect_error(model, lambda bad=bad: steer(model, a, bad))
        expect_error(model, lambda bad=bad: steer(model, [a, b], multipliers=[1.0, bad]))
        expect_error(model, lambda bad=bad: steer(model, [a, b], multipliers=torch.tensor([[1.0, 1.0], [bad, 0.0]])))


def test_multipliers_of_wrong_shape_raise() -> None:
    model = new_model("llama")
    a, b = default_circuit(model), make_circuit(model, [2], [4])
    for shape_bad in ([1.0, 2.0, 3.0], [1.0], torch.ones(2, 3), torch.ones(3, 1), torch.ones(2, 2, 2),
                      torch.ones(0, 2), torch.tensor(1.0)):
        expect_error(model, lambda shape_bad=shape_bad: steer(model, [a, b], multipliers=shape_bad))


def test_per_row_rows_must_match_batch_at_forward_time() -> None:
    model = new_model("llama")
    circuit = default_circuit(model)
    with steer(model, circuit, multipliers=torch.tensor([[0.0], [2.0]])):
        with pytest.raises(CNAError, match="rows"):
            logits_of(model, token_ids(3, 5))
        with pytest.raises(CNAError):
            logits_of(model, token_ids(1, 5))
        logits_of(model, token_ids(2, 5))  # the right batch size still works
    assert_no_hooks(model)


def test_nesting_and_listing_the_same_circuit_twice() -> None:
    model = new_model("llama")
    circuit = default_circuit(model)
    twin = make_circuit(model, circuit.layers.tolist()[::-1], circuit.neurons.tolist()[::-1])  # same neurons
    ids = token_ids(2, 7, seed=9)
    before = snapshot(model)
    with steer(model, circuit, 0.5):
        hooks = hook_count(model)
        with pytest.raises(CNAError):
            steer(model, circuit, 2.0)
        with pytest.raises(CNAError):
            steer(model, twin, 2.0)
        assert hook_count(model) == hooks  # the failed inner steer left nothing behind
        with steer(model, make_circuit(model, [2], [9]), 0.0):  # a different circuit may nest
            pass
    assert_no_hooks(model)
    expect_error(model, lambda: steer(model, [circuit, circuit], multipliers=[1.0, 1.0]))
    expect_error(model, lambda: steer(model, [circuit, twin], multipliers=[1.0, 1.0]))
    expect_error(model, lambda: steer(model, circuit, 0.0, positions="decode"))
    expect_error(model, lambda: steer(model, [], 0.0))

    expected = logits_of(hand_scaled(model, factors_of([circuit], [0.5 * 3.0])), ids)
    with steer(model, circuit, 0.5):
        with steer(model, circuit, 3.0, allow_stacking=True):
            nested = logits_of(model, ids)
    torch.testing.assert_close(nested, expected, atol=ATOL, rtol=0)
    with steer(model, [circuit, circuit], multipliers=[0.5, 3.0], allow_stacking=True):
        listed = logits_of(model, ids)
    torch.testing.assert_close(listed, expected, atol=ATOL, rtol=0)
    assert_no_hooks(model)
    assert_state_identical(model, before)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "phi"])
def test_the_kv_cache_goes_under_the_keyword_this_transformers_declares(arch: str) -> None:
    """transformers 5.25 renamed `past_key_values` to `cache` (the old name warns, and goes in 5.40). Capture and
    the batch engine pass the cache under the installed release's name; steering finds it by its type."""
    from packaging.version import Version
    from transformers import DynamicCache

    model = new_model(arch)
    expected = "cache" if Version(transformers.__version__) >= Version("5.25") else "past_key_values"
    assert cache_keyword(model) == cache_keyword(get_adapter(model).body) == expected
    cache = DynamicCache(config=model.config)
    assert find_cache((), {expected: cache, "use_cache": True}) is cache
    assert find_cache((token_ids(1, 3, seed=1), None, None, cache), {}) is cache
    assert find_cache((), {"use_cache": False}) is None
