"""Mixture-of-experts models: routed-expert neurons captured, ranked, steered and exported exactly."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cna_fast import capture_contrast, discover, steer
from cna_fast.batching import encode_prompts
from cna_fast.circuit import Circuit
from cna_fast.errors import CircuitMismatchError, CNAError
from cna_fast.models import get_adapter
from cna_fast.models.moe import register_row_hook
from cna_fast.stats import MoEStats
from tests.conftest import NEGATIVE, POSITIVE
from tests.tiny import assert_close_in_ulps, assert_state_identical, snapshot
from tests.tiny_moe import EXPERT_WIDTH, EXPERTS, MOE_FAMILIES, TOP_K, build_tiny_moe

IMPLEMENTATIONS = ("eager", "batched_mm", "grouped_mm")
REDUCTIONS = ("last", "all", "mean")
MODES = ("effective", "conditional")


def token_ids(vocab: int, rows: int = 3, length: int = 9) -> torch.Tensor:
    return torch.randint(3, vocab, (rows, length), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits_of(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits


# ------------------------------------------------------------------------------------- the hooked forward


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_hooked_experts_forward_is_bit_identical_for_every_implementation(family, tokenizer):
    """A row hook that changes nothing leaves the logits bit-identical; removing it restores the experts."""
    ids = token_ids(len(tokenizer))
    for implementation in IMPLEMENTATIONS:
        model = build_tiny_moe(family, len(tokenizer), experts_implementation=implementation)
        expected = logits_of(model, ids)
        adapter = get_adapter(model)
        rows = []
        handles = [register_row_hook(adapter.experts(layer), lambda h, e, t, w, rows=rows: rows.append(h.shape))
                   for layer in adapter.routed_layers]
        assert torch.equal(logits_of(model, ids), expected), implementation
        assert sum(shape[0] for shape in rows) == len(adapter.routed_layers) * ids.numel() * 2  # top-2 rows per token
        assert all(shape[1] == EXPERT_WIDTH for shape in rows)
        for handle in handles:
            handle.remove()
        assert all("forward" not in adapter.experts(layer).__dict__ for layer in adapter.routed_layers)


def test_adapter_describes_dense_shared_and_routed_layers(tokenizer):
    qwen2 = get_adapter(build_tiny_moe("qwen2_moe", len(tokenizer)))
    assert qwen2.routed_layers == [1, 2, 3] and qwen2.widths == [48, 24, 24, 24]
    assert qwen2.num_neurons == 48 + 3 * 24 + 3 * EXPERTS * EXPERT_WIDTH
    deepseek = get_adapter(build_tiny_moe("deepseek_v3", len(tokenizer)))
    assert deepseek.routed_layers == [1, 2, 3] and deepseek.widths == [48, 16, 16, 16]
    mixtral = get_adapter(build_tiny_moe("mixtral", len(tokenizer)))
    assert mixtral.widths == [0, 0, 0, 0] and mixtral.num_neurons == 4 * EXPERTS * EXPERT_WIDTH
    with pytest.raises(CNAError, match="only routed experts"):
        mixtral.neuron_site(0)


# ------------------------------------------------------------------------- statistics vs a float64 loop


def expert_activation(experts: nn.Module, x: torch.Tensor, expert: int) -> torch.Tensor:
    """h = gate(x W_up[expert] + b) in float64, written out per expert."""
    weight = (experts.gate_up_proj if experts.has_gate else experts.up_proj)[expert].double()
    projected = x.double() @ (weight if experts.is_transposed else weight.T)
    if experts.has_bias:
        bias = experts.gate_up_proj_bias if experts.has_gate else experts.up_proj_bias
        projected = projected + bias[expert].double()
    return experts._apply_gate(projected) if experts.has_gate else experts.act_fn(projected)


def per_token_values(model, tokenizer, prompts: list[str]) -> list[dict]:
    """Per prompt and MoE layer: effective values w*h [T, E, W], activations h [T, E, W], routed mask [T, E];
    per ordinary layer: the down-projection input [T, d]. One prompt at a time, no padding."""
    adapter = get_adapter(model)
    results = []
    for ids in encode_prompts(tokenizer, prompts):
        inputs, ordinary = {}, {}
        handles = [adapter.experts(layer).register_forward_pre_hook(
            lambda module, args, layer=layer, inputs=inputs: inputs.__setitem__(layer, args))
            for layer in adapter.routed_layers]
        handles += [adapter.neuron_site(layer).register_forward_pre_hook(
            lambda module, args, layer=layer, ordinary=ordinary: ordinary.__setitem__(
                layer, args[0].reshape(-1, args[0].shape[-1])))
            for layer in adapter.ordinary_layers()]
        logits_of(model, torch.tensor([ids]))
        for handle in handles:
            handle.remove()
        prompt = {"ordinary": {layer: rows.double() for layer, rows in ordinary.items()}}
        for layer, (hidden, index, weights) in inputs.items():
            experts = adapter.experts(layer)
            tokens = hidden.shape[0]
            h = torch.zeros(tokens, EXPERTS, EXPERT_WIDTH, dtype=torch.float64)
            effective = torch.zeros_like(h)
            routed = torch.zeros(tokens, EXPERTS, dtype=torch.bool)
            for token in range(tokens):
                for slot in range(index.shape[1]):
                    expert = int(index[token, slot])
                    h[token, expert] = expert_activation(experts, hidden[token], expert)
                    effective[token, expert] = float(weights[token, slot]) * h[token, expert]
                    routed[token, expert] = True
            prompt[layer] = (effective, h, routed)
        results.append(prompt)
    return results


def reference_moments(prompts: list[dict], layer: int, reduction: str, mode: str):
    """Mean and unbiased variance [E, W] and sample count [E] of one side, from per-token values."""
    samples, masks = [], []
    for prompt in prompts:
        effective, h, routed = prompt[layer]
        values = effective if mode == "effective" else h
        if reduction == "last":
            samples.append(values[-1:]), masks.append(routed[-1:])
        elif reduction == "all":
            samples.append(values), masks.append(routed)
        elif mode == "effective":
            samples.append(values.mean(0, keepdim=True)), masks.append(routed.any(0, keepdim=True))
        else:
            count = routed.sum(0)
            mean = values.sum(0) / count.clamp_min(1)[:, None]
            samples.append(mean[None]), masks.append((count > 0)[None])
    values, routed = torch.cat(samples), torch.cat(masks)
    if mode == "effective":
        return values.mean(0), values.var(0), torch.full((EXPERTS,), float(values.shape[0]), dtype=torch.float64)
    means = torch.stack([values[routed[:, e], e].mean(0) if routed[:, e].any() else torch.zeros(EXPERT_WIDTH)
                         for e in range(EXPERTS)])
    variances = torch.stack([values[routed[:, e], e].var(0) if routed[:, e].sum() > 1 else torch.full(
        (EXPERT_WIDTH,), torch.nan) for e in range(EXPERTS)])
    return means, variances, routed.sum(0).double()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_statistics_equal_a_float64_per_expert_loop(family, tokenizer):
    """Both modes and every reduction, batched and padded, equal the one-prompt-at-a-time float64 reference."""
    model = build_tiny_moe(family, len(tokenizer), experts_implementation="grouped_mm")
    sides = {1: per_token_values(model, tokenizer, POSITIVE), 0: per_token_values(model, tokenizer, NEGATIVE)}
    adapter = get_adapter(model)
    for reduction in REDUCTIONS:
        for mode in MODES:
            stats = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, reduction=reduction, moe_mode=mode,
                                     batch_size=3, progress=False)
            variance = stats.routed.variance()
            for slot, layer in enumerate(stats.routed.layers):
                for side, prompts in sides.items():
                    mean, var, count = reference_moments(prompts, layer, reduction, mode)
                    where = f"{reduction} {mode} layer {layer} side {side}"
                    torch.testing.assert_close(stats.routed.count[slot, :, side], count, msg=where)
                    torch.testing.assert_close(stats.routed.mean[slot, :, side], mean, rtol=1e-4, atol=1e-5, msg=where)
                    torch.testing.assert_close(variance[slot, :, side], var, rtol=1e-4, atol=1e-5, equal_nan=True,
                                               msg=where)
            for part in stats.ordinary:
                for row, layer in enumerate(part.layers):
                    for side, prompts in sides.items():
                        rows = [p["ordinary"][layer] for p in prompts]
                        rows = ([r[-1:] for r in rows] if reduction == "last" else rows if reduction == "all"
                                else [r.mean(0, keepdim=True) for r in rows])
                        torch.testing.assert_close(part.mean[row, side], torch.cat(rows).mean(0), rtol=1e-4, atol=1e-5)
    assert adapter.routed_layers == stats.routed.layers


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_every_experts_implementation_gives_the_same_statistics(family, tokenizer):
    results = {}
    for implementation in IMPLEMENTATIONS:
        model = build_tiny_moe(family, len(tokenizer), experts_implementation=implementation)
        results[implementation] = [capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, reduction="all",
                                                    moe_mode=mode, batch_size=4, progress=False) for mode in MODES]
    for implementation in ("batched_mm", "grouped_mm"):
        for reference, stats in zip(results["eager"], results[implementation]):
            assert torch.equal(stats.routed.count, reference.routed.count)
            torch.testing.assert_close(stats.routed.mean, reference.routed.mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(stats.routed.variance(), reference.routed.variance(), rtol=1e-4, atol=1e-5,
                                       equal_nan=True)


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_batch_size_and_padding_do_not_change_the_statistics(family, tokenizer):
    model = build_tiny_moe(family, len(tokenizer))
    for reduction in REDUCTIONS:
        reference = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, reduction=reduction, batch_size=1,
                                     progress=False)
        for batch_size, side in ((3, "right"), (8, "left")):
            stats = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, reduction=reduction, batch_size=batch_size,
                                     padding_side=side, prefix_cache=False, progress=False)
            torch.testing.assert_close(stats.routed.mean, reference.routed.mean, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(stats.routed.variance(), reference.routed.variance(), rtol=1e-4, atol=1e-4)
            for part, expected in zip(stats.ordinary, reference.ordinary):
                torch.testing.assert_close(part.mean, expected.mean, rtol=1e-4, atol=1e-4)


def test_statistics_merge_save_and_load_exactly(tokenizer, tmp_path):
    """Two halves merged (Chan) equal one pass; a saved file reads back bit for bit; memory does not grow.

    One prompt per batch, so every split runs the same forwards and only the merge order differs."""
    model = build_tiny_moe("deepseek_v3", len(tokenizer))
    settings = dict(reduction="all", moe_mode="conditional", batch_size=1, progress=False)
    whole = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, **settings)
    first = capture_contrast(model, tokenizer, POSITIVE[:2], NEGATIVE[:3], **settings)
    second = capture_contrast(model, tokenizer, POSITIVE[2:], NEGATIVE[3:], **settings)
    merged = first.merge(second)
    torch.testing.assert_close(merged.routed.mean, whole.routed.mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(merged.routed.m2, whole.routed.m2, rtol=1e-9, atol=1e-9)
    assert torch.equal(merged.routed.routed, whole.routed.routed)
    whole.save(tmp_path / "stats.safetensors")
    loaded = MoEStats.load(tmp_path / "stats.safetensors")
    assert loaded.routed.mode == "conditional" and loaded.routed.layers == whole.routed.layers
    for name, tensor in whole.routed.tensors().items():
        assert torch.equal(getattr(loaded.routed, name), tensor), name
    assert [p.layers for p in loaded.ordinary] == [p.layers for p in whole.ordinary]
    assert whole.routed.mean.shape == (3, EXPERTS, 2, EXPERT_WIDTH)  # layers x experts x sides x width, any prompts


# ------------------------------------------------------------------------------------------ planted neuron

PLANT_EXPERT, PLANT_NEURON, MARK = 5, 11, 7  # MARK: a residual coordinate only the "zebra" tokens write


def plant_zebra_neuron(model, tokenizer) -> int:
    """Expert PLANT_EXPERT of the last layer gets the zebra tokens and neuron PLANT_NEURON fires for them only.

    The zebra tokens' embeddings (and only theirs) carry a large value in coordinate MARK; no
    attention or MLP writes to MARK, so it reaches the last layer unchanged. The router sends MARK
    to the planted expert, whose neuron reads only MARK: exactly 0 for every other token.
    """
    zebra = {ids[0] for ids in tokenizer([" zebra", "zebra"], add_special_tokens=False)["input_ids"]}
    adapter = get_adapter(model)
    layer = adapter.routed_layers[-1]
    experts = adapter.experts(layer)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[:, MARK] = 0.0
        embeddings[sorted(zebra), MARK] = 30.0
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter[MARK] = 0.0
            elif name.endswith(("o_proj.bias", "down_proj.bias", "down_proj_bias")):
                parameter[..., MARK] = 0.0
        for candidate in (adapter.experts(index) for index in adapter.routed_layers):
            (candidate.down_proj[:, :, MARK] if candidate.is_transposed else candidate.down_proj[:, MARK, :]).zero_()
        router = next(module for name, module in adapter.mlp(layer).named_children() if name in ("gate", "router"))
        router.weight[:, MARK] = 0.0
        router.weight[PLANT_EXPERT, MARK] = 5.0
        width = EXPERT_WIDTH
        gate_up = experts.gate_up_proj[PLANT_EXPERT]
        rows = ([2 * PLANT_NEURON, 2 * PLANT_NEURON + 1] if not experts.is_concatenated
                else [PLANT_NEURON, width + PLANT_NEURON])  # GPT-OSS interleaves gate and up
        for row in rows:
            if experts.is_transposed:
                gate_up[:, row] = 0.0
                gate_up[MARK, row] = 3.0
            else:
                gate_up[row] = 0.0
                gate_up[row, MARK] = 3.0
        if experts.has_bias:
            experts.gate_up_proj_bias[PLANT_EXPERT, rows] = 0.0
    return layer


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_planted_expert_neuron_ranks_first(family, tokenizer):
    model = build_tiny_moe(family, len(tokenizer))
    layer = plant_zebra_neuron(model, tokenizer)
    for mode in MODES:
        circuit = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=5, reduction="all", moe_mode=mode,
                           progress=False)
        top = (int(circuit.layers[0]), int(circuit.experts[0]), int(circuit.neurons[0]))
        assert top == (layer, PLANT_EXPERT, PLANT_NEURON), (mode, circuit.summary())
        assert circuit.mean_negative[0] == 0.0 and circuit.deltas[0] > 0
    stats = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, reduction="all", progress=False)
    frequency = stats.routed.routing_frequency()
    torch.testing.assert_close(frequency.sum(1), torch.full_like(frequency.sum(1), float(TOP_K)))  # k experts/token


# ----------------------------------------------------------------------------------------------- steering


def routed_circuit(model, layers, experts, neurons) -> Circuit:
    n = len(layers)
    values = torch.linspace(1.0, 0.1, n, dtype=torch.float64)
    return Circuit(layers=layers, experts=experts, neurons=neurons, scores=values, deltas=values, mean_positive=values,
                   mean_negative=torch.zeros(n), std_positive=torch.ones(n), std_negative=torch.ones(n),
                   meta={"architecture": get_adapter(model).architecture()})


def mixed_circuit(model) -> Circuit:
    """Routed neurons in two experts of two layers, plus ordinary ones where the model has them."""
    adapter = get_adapter(model)
    first, last = adapter.routed_layers[0], adapter.routed_layers[-1]
    layers, experts, neurons = [first, first, last, last, last], [0, 3, 3, 3, 6], [1, 2, 0, 15, 7]
    for layer in adapter.ordinary_layers()[:2]:
        layers, experts, neurons = layers + [layer], experts + [-1], neurons + [adapter.widths[layer] - 1]
    return routed_circuit(model, layers, experts, neurons)


def folded_by_hand(model, circuit: Circuit, multiplier: float):
    """A copy whose circuit columns (expert down projections and ordinary ones) are scaled by hand."""
    folded = copy.deepcopy(model)
    adapter = get_adapter(folded)
    with torch.no_grad():
        for layer, expert, neuron in zip(circuit.layers.tolist(), circuit.experts.tolist(), circuit.neurons.tolist()):
            if expert < 0:
                adapter.neuron_site(layer).weight[:, neuron] *= multiplier
            elif adapter.experts(layer).is_transposed:
                adapter.experts(layer).down_proj[expert, neuron, :] *= multiplier
            else:
                adapter.experts(layer).down_proj[expert, :, neuron] *= multiplier
    return folded


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_steering_equals_the_folded_export_and_hand_ablation(family, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from cna_fast.export import export_folded

    model = build_tiny_moe(family, len(tokenizer))
    circuit = mixed_circuit(model)
    ids = token_ids(len(tokenizer))
    before = snapshot(model)
    base = logits_of(model, ids)
    with steer(model, circuit, 0.0):
        ablated = logits_of(model, ids)
    assert not torch.allclose(ablated, base, atol=1e-4), "the circuit must change the logits"
    assert_close_in_ulps(ablated, logits_of(folded_by_hand(model, circuit, 0.0), ids))
    for multiplier, tolerance in ((0.5, 4), (0.3, 16)):  # 0.3 x h and 0.3 x W round differently in float32
        with steer(model, circuit, multiplier):
            steered = logits_of(model, ids)
        out = export_folded(model, circuit, multiplier, tmp_path / f"folded{multiplier}")
        folded = AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager").eval()
        assert_close_in_ulps(steered, logits_of(folded, ids), ulps=tolerance)
    assert_state_identical(model, before)
    assert torch.equal(logits_of(model, ids), base)  # nothing left behind


def test_steering_reaches_generated_tokens(tokenizer):
    """Greedy generation with steering equals generation from the folded copy: prompt and new tokens alike."""
    model = build_tiny_moe("qwen3_moe", len(tokenizer))
    circuit = mixed_circuit(model)
    ids = token_ids(len(tokenizer), rows=2, length=5)
    folded = folded_by_hand(model, circuit, 0.0)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=2)
    with torch.no_grad(), steer(model, circuit, 0.0):
        steered = model.generate(input_ids=ids, **settings)
    with torch.no_grad():
        expected = folded.generate(input_ids=ids, **settings)
        plain = model.generate(input_ids=ids, **settings)
    assert torch.equal(steered, expected) and not torch.equal(steered, plain)


def without(model, circuit: Circuit, neuron: tuple[int, int, int]) -> Circuit:
    """The circuit minus one (layer, expert, neuron)."""
    keep = [i for i, entry in enumerate(zip(circuit.layers.tolist(), circuit.experts.tolist(),
                                            circuit.neurons.tolist())) if entry != neuron]
    return routed_circuit(model, circuit.layers[keep].tolist(), circuit.experts[keep].tolist(),
                          circuit.neurons[keep].tolist())


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_per_row_multipliers_and_several_circuits(family, tokenizer):
    model = build_tiny_moe(family, len(tokenizer))
    last = get_adapter(model).routed_layers[-1]
    circuit = mixed_circuit(model)
    other = routed_circuit(model, [last, last], [3, 1], [0, 4])  # (last, 3, 0) is in both circuits
    ids = token_ids(len(tokenizer), rows=3)
    table = [[0.0, 1.0], [2.0, 0.5], [1.0, -1.0]]
    rows = []  # row r of the whole batch steered with row r's multipliers (same batch: same arithmetic)
    for row, factors in enumerate(table):
        with steer(model, [circuit, other], multipliers=factors):
            rows.append(logits_of(model, ids)[row:row + 1])
    with steer(model, [circuit, other], multipliers=torch.tensor(table)):
        per_row = logits_of(model, ids)
    # Other rows' steering changes their routing, so experts multiply differently sized row groups: float32 noise.
    torch.testing.assert_close(per_row, torch.cat(rows), rtol=0, atol=1e-5)
    with steer(model, [circuit, other], multipliers=[2.0, 0.5]):  # the shared neuron gets 2 x 0.5 = 1
        both = logits_of(model, ids)
    shared = (last, 3, 0)
    with steer(model, [without(model, circuit, shared), without(model, other, shared)], multipliers=[2.0, 0.5]):
        expected = logits_of(model, ids)
    assert_close_in_ulps(both, expected)
    with pytest.raises(CNAError, match="rows"):
        with steer(model, circuit, multipliers=torch.zeros(2, 1)):
            logits_of(model, ids)


# ---------------------------------------------------------------------------------------- circuit format


def test_circuit_experts_round_trip_and_mismatch(tokenizer, tmp_path):
    model = build_tiny_moe("deepseek_v3", len(tokenizer))
    circuit = discover(model, tokenizer, POSITIVE, NEGATIVE, top_k=12, progress=False)
    assert circuit.routed.any() and (~circuit.routed).any()
    circuit.save(tmp_path / "c.safetensors")
    loaded = Circuit.load(tmp_path / "c.safetensors")
    assert torch.equal(loaded.experts, circuit.experts) and torch.equal(loaded.neurons, circuit.neurons)
    records = json.loads(circuit.to_json())["neurons"]
    assert [r["expert"] for r in records] == circuit.experts.tolist()
    header, *lines = circuit.to_csv().splitlines()
    assert header.split(",")[:4] == ["rank", "layer", "expert", "neuron"]
    assert [int(line.split(",")[2]) for line in lines] == circuit.experts.tolist()
    assert "routing frequency" in loaded.summary()
    more_experts = build_tiny_moe("deepseek_v3", len(tokenizer), n_routed_experts=16)
    with pytest.raises(CircuitMismatchError, match="16 experts"):
        steer(more_experts, loaded, 0.0)
    wider = build_tiny_moe("deepseek_v3", len(tokenizer), moe_intermediate_size=32)
    with pytest.raises(CircuitMismatchError):
        steer(wider, loaded, 0.0)


def test_dense_circuit_files_still_load(tiny_llama, tokenizer, tmp_path):
    circuit = discover(tiny_llama, tokenizer, POSITIVE, NEGATIVE, top_k=4, progress=False)
    circuit.save(tmp_path / "dense.safetensors")
    loaded = Circuit.load(tmp_path / "dense.safetensors")
    assert loaded.experts is None and not loaded.routed.any()
    assert "expert" not in loaded.to_csv().splitlines()[0]


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_lora_export_on_expert_parameters_equals_steering(family, tokenizer, tmp_path):
    """PEFT's LoRA on the 3-D expert down projections (plus ordinary down projections) reproduces steering."""
    from peft import PeftModel

    from cna_fast.export import export_lora

    model = build_tiny_moe(family, len(tokenizer))
    circuit = mixed_circuit(model)
    ids = token_ids(len(tokenizer))
    with steer(model, circuit, 0.5):
        expected = logits_of(model, ids)
    export_lora(model, circuit, 0.5, tmp_path / "lora", check_vllm=False)  # vLLM has no expert-parameter LoRA
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert config["r"] == 2 and len(config["target_parameters"]) == 2  # (last layer, expert 3) has 2 neurons
    with_lora = PeftModel.from_pretrained(build_tiny_moe(family, len(tokenizer)), tmp_path / "lora").eval()
    torch.testing.assert_close(logits_of(with_lora, ids), expected, rtol=0, atol=1e-5)


def test_fused_backend_falls_back_to_hooks_on_moe_with_a_warning(tokenizer, monkeypatch):
    """The Triton kernels do not cover routed experts: forcing them warns and gives the hook path's results."""
    model = build_tiny_moe("qwen2_moe", len(tokenizer))
    expected = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, progress=False)
    circuit = mixed_circuit(model)
    ids = token_ids(len(tokenizer))
    with steer(model, circuit, 0.5):
        steered = logits_of(model, ids)
    monkeypatch.setenv("CNA_FAST_BACKEND", "triton")
    with pytest.warns(UserWarning, match="do not cover routed experts"):
        stats = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, progress=False)
    assert torch.equal(stats.routed.mean, expected.routed.mean)
    with pytest.warns(UserWarning, match="do not cover mixture-of-experts"):
        with steer(model, circuit, 0.5):
            assert torch.equal(logits_of(model, ids), steered)


def test_random_control_circuit_keeps_layers_and_experts(tokenizer):
    model = build_tiny_moe("deepseek_v3", len(tokenizer))
    circuit = mixed_circuit(model)
    control = circuit.random_like(seed=3)
    assert sorted(zip(control.layers.tolist(), control.experts.tolist())) == sorted(
        zip(circuit.layers.tolist(), circuit.experts.tolist()))
    assert not set(zip(control.layers.tolist(), control.experts.tolist(), control.neurons.tolist())) & set(
        zip(circuit.layers.tolist(), circuit.experts.tolist(), circuit.neurons.tolist()))
    control.validate(model)
