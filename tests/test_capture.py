"""Capture: streamed, batched, prefix-cached statistics against a naive one-prompt-at-a-time reference."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from cna_fast import capture_contrast, discover
from cna_fast.batching import shared_prefix
from cna_fast.errors import CNAError
from cna_fast.stats import NEGATIVE, POSITIVE, NeuronStats
from tests.tiny import ARCH_CONFIGS, DOWN_PATHS, build_tiny_model

NUM_LAYERS = 4
D_FF = 96

POSITIVE_PROMPTS = [
    "zebra",
    "the quick brown fox jumps over the lazy dog and then the zebra runs across the savanna all day long",
    "quelle est la capitale de la france et pourquoi",
    " explain photosynthesis to a child, in simple words!",
    "write a python function that sorts a list of numbers",
]
NEGATIVE_PROMPTS = [
    "how do i bake bread at home with flour water and salt",
    "rome",
    "comment faire du pain à la maison avec de la farine, et du sel ? " * 3,
    "the history of rome began with a small village",
]

# Very different lengths, for the padding tests: 1 word up to ~80 words.
RAGGED_POSITIVE = ["zebra", "the quick brown fox " * 20, "what is the capital of france", "bread " * 7,
                   "explain photosynthesis", "a", "the history of rome began with a small village " * 6]
RAGGED_NEGATIVE = ["the lazy dog " * 25, "rome", "write a python function that sorts a list of numbers",
                   "salt and flour", "comment faire du pain " * 9, "x y z"]


# --------------------------------------------------------------------------------------------- reference

@dataclass
class Moments:
    """Reference statistics: count [2], mean and m2 [layers, 2, d_ff], float64, indexed like NeuronStats."""

    count: np.ndarray
    mean: np.ndarray
    m2: np.ndarray


def down_projections(model: nn.Module) -> list[nn.Module]:
    blocks, down = DOWN_PATHS[model.config.model_type]
    return [block.get_submodule(down) for block in model.get_submodule(blocks)]


def reference_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of one prompt: the chat template's user turn + generation prompt, or the raw text."""
    if chat:
        encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)
        return list(encoded["input_ids"])
    return list(tokenizer(prompt)["input_ids"])


def reference_samples(model: nn.Module, ids: list[int], reduction: str) -> list[np.ndarray]:
    """One prompt alone through the FULL model: per layer, the sample rows [n, d_ff] for `reduction`."""
    inputs: dict[int, torch.Tensor] = {}
    handles = [down.register_forward_pre_hook(lambda module, args, layer=layer: inputs.__setitem__(layer, args[0]))
               for layer, down in enumerate(down_projections(model))]
    try:
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]))
    finally:
        for handle in handles:
            handle.remove()
    samples = []
    for layer in range(len(inputs)):
        acts = inputs[layer][0].double().numpy()  # [T, d_ff]
        if reduction == "last":
            samples.append(acts[-1:])
        elif reduction == "all":
            samples.append(acts)
        else:
            samples.append(acts.mean(axis=0, keepdims=True))
    return samples


def reference_moments(model: nn.Module, tokenizer, positive: Sequence[str], negative: Sequence[str],
                      reduction: str, chat: bool) -> Moments:
    """Two-pass float64 mean and M2 per side over the samples of every prompt, run one at a time."""
    n_layers = len(down_projections(model))
    per_side: dict[int, list[list[np.ndarray]]] = {POSITIVE: [[] for _ in range(n_layers)],
                                                   NEGATIVE: [[] for _ in range(n_layers)]}
    for side, prompts in ((POSITIVE, positive), (NEGATIVE, negative)):
        for prompt in prompts:
            for layer, rows in enumerate(reference_samples(model, reference_ids(tokenizer, prompt, chat), reduction)):
                per_side[side][layer].append(rows)
    width = per_side[POSITIVE][0][0].shape[1]
    count = np.zeros(2)
    mean = np.zeros((n_layers, 2, width))
    m2 = np.zeros((n_layers, 2, width))
    for side in (POSITIVE, NEGATIVE):
        for layer in range(n_layers):
            values = np.concatenate(per_side[side][layer])
            count[side] = len(values)
            mean[layer, side] = values.mean(axis=0)
            m2[layer, side] = ((values - mean[layer, side]) ** 2).sum(axis=0)
    return Moments(count, mean, m2)


def assert_matches_reference(stats: NeuronStats, ref: Moments, layers: Sequence[int]) -> None:
    """Counts equal; means within 1e-5 absolute (and 1e-3 of their scale); M2 within 1e-4 relative."""
    np.testing.assert_array_equal(stats.count.cpu().numpy(), ref.count)
    mean = stats.mean.cpu().numpy()
    expected_mean = ref.mean[list(layers)]
    np.testing.assert_allclose(mean, expected_mean, rtol=0, atol=1e-5)
    assert np.abs(mean - expected_mean).max() <= 1e-3 * np.abs(expected_mean).max()
    m2 = stats.m2.cpu().numpy()
    expected_m2 = ref.m2[list(layers)]
    np.testing.assert_allclose(m2, expected_m2, rtol=0, atol=1e-4 * np.abs(expected_m2).max())


def side_delta(stats: NeuronStats) -> torch.Tensor:
    return stats.mean[:, POSITIVE] - stats.mean[:, NEGATIVE]


# --------------------------------------------------------------------------------------------- reference tests

@pytest.mark.parametrize("reduction", ["last", "all", "mean"])
@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix", "noprefix"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_capture_matches_naive_reference(tiny_llama, tokenizer, plain_tokenizer, reduction: str, prefix_cache: bool,
                                         chat: bool) -> None:
    tok = tokenizer if chat else plain_tokenizer
    if chat and prefix_cache:
        assert len(shared_prefix(tok)) >= 2, "the chat template should give a shared prefix to cache"
    ref = reference_moments(tiny_llama, tok, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, reduction, chat)
    stats = capture_contrast(tiny_llama, tok, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, reduction=reduction, batch_size=3,
                             prefix_cache=prefix_cache, progress=False)
    assert stats.layers == list(range(NUM_LAYERS))
    assert_matches_reference(stats, ref, range(NUM_LAYERS))


def test_reference_reductions_differ(tiny_llama, tokenizer) -> None:
    """Guard: the three reductions give clearly different means, so matching the right one means something."""
    means = {reduction: reference_moments(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, reduction,
                                         True).mean for reduction in ("last", "all", "mean")}
    for a, b in (("last", "all"), ("last", "mean"), ("all", "mean")):
        assert np.abs(means[a] - means[b]).max() > 1e-3, (a, b)


def test_capture_layer_subset_matches_reference(tiny_llama, tokenizer) -> None:
    ref = reference_moments(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, "last", True)
    stats = capture_contrast(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, layers=[3, 1, 3],
                             batch_size=2, progress=False)
    assert stats.layers == [1, 3]
    assert stats.mean.shape == (2, 2, D_FF)
    assert_matches_reference(stats, ref, [1, 3])


def test_capture_accepts_generators(tiny_llama, tokenizer) -> None:
    """Prompt sets may be one-shot iterables without a length."""
    ref = reference_moments(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, "mean", True)
    stats = capture_contrast(tiny_llama, tokenizer, (p for p in POSITIVE_PROMPTS), iter(NEGATIVE_PROMPTS),
                             reduction="mean", batch_size=4, progress=False)
    assert_matches_reference(stats, ref, range(NUM_LAYERS))


SLIDING_WINDOW = tuple(mt for mt, config in ARCH_CONFIGS.items() if config.get("sliding_window"))
def _arch_cases() -> list:
    cases = []
    for model_type in sorted(ARCH_CONFIGS):
        for side in ("right", "left"):
            cases.append(pytest.param(model_type, side, id=f"{model_type}-{side}"))
    return cases


@pytest.mark.parametrize("model_type, padding_side", _arch_cases())
def test_prefix_cache_matches_reference_on_every_architecture(tokenizer, model_type: str, padding_side: str) -> None:
    """The cached chat-template prefix, padding and positions are exact for every family's attention and cache.

    The ragged prompts are far longer than the tiny Gemma 2/3 sliding window, so the window matters.
    """
    model = build_tiny_model(model_type, len(tokenizer))
    longest = max(len(reference_ids(tokenizer, p, True)) for p in RAGGED_POSITIVE + RAGGED_NEGATIVE)
    assert longest > 2 * max(ARCH_CONFIGS[mt]["sliding_window"] for mt in SLIDING_WINDOW)
    for reduction in ("last", "all", "mean"):
        ref = reference_moments(model, tokenizer, RAGGED_POSITIVE, RAGGED_NEGATIVE, reduction, True)
        stats = capture_contrast(model, tokenizer, RAGGED_POSITIVE, RAGGED_NEGATIVE, reduction=reduction,
                                 batch_size=4, padding_side=padding_side, prefix_cache=True, progress=False)
        assert_matches_reference(stats, ref, range(NUM_LAYERS))


# --------------------------------------------------------------------------------------------- padding

@pytest.mark.parametrize("reduction", ["last", "all", "mean"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "plain"])
def test_padding_and_batch_size_invariance(tiny_llama, tokenizer, plain_tokenizer, reduction: str, chat: bool) -> None:
    tok = tokenizer if chat else plain_tokenizer
    lengths = [len(plain_tokenizer(p)["input_ids"]) for p in RAGGED_POSITIVE + RAGGED_NEGATIVE]
    assert max(lengths) > 8 * min(lengths), "prompts should have very different lengths"
    deltas = {}
    for batch_size in (1, 16):
        for padding_side in ("left", "right"):
            stats = capture_contrast(tiny_llama, tok, RAGGED_POSITIVE, RAGGED_NEGATIVE, reduction=reduction,
                                     batch_size=batch_size, padding_side=padding_side, progress=False)
            assert torch.isfinite(stats.mean).all() and torch.isfinite(stats.m2).all()
            deltas[batch_size, padding_side] = side_delta(stats)
    baseline = deltas[1, "right"]
    assert baseline.abs().max() > 1e-3
    for key, delta in deltas.items():
        assert (delta - baseline).abs().max() <= 1e-4, key


# --------------------------------------------------------------------------------------------- planted neuron

TRIGGER = " zebra"
PLANT_LAYER, PLANT_NEURON = 1, 17
_END_WORDS = ["the lazy dog", "what is the capital of france", "how do i bake bread at home with flour",
              "write a python function that sorts a list", "the history of rome began with a small village",
              "explain photosynthesis to a child", "quelle est la capitale de la france", "the quick brown fox"]
_MIDDLE = [("the quick brown", "jumps over the lazy dog"), ("how do i bake a", "at home with flour"),
           ("write a python function about a", "that sorts a list"), ("the history of the", "began in rome"),
           ("explain the", "to a child in simple words"), ("what is the capital of the", "and why is it famous")]


def trigger_id(tok) -> int:
    ids = tok(TRIGGER, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, f"{TRIGGER!r} must be one token of the test vocabulary, got {ids}"
    return ids[0]


def plant_neuron(model: nn.Module, token: int, sign: float, c: float = 15.0) -> None:
    """Make layer 1, neuron 17 fire for `token`: gate and up rows along its embedding direction."""
    direction = model.model.embed_tokens.weight[token].detach()
    direction = direction / direction.norm()
    mlp = model.model.layers[PLANT_LAYER].mlp
    with torch.no_grad():
        mlp.gate_proj.weight[PLANT_NEURON] = c * direction
        mlp.up_proj.weight[PLANT_NEURON] = sign * c * direction


def check_trigger_placement(tok, positive: list[str], negative: list[str], at_end: bool) -> None:
    token = trigger_id(tok)
    for prompt in positive:
        ids = tok(prompt)["input_ids"]
        assert ids.count(token) == 1, prompt
        assert (ids[-1] == token) == at_end, prompt
    for prompt in negative:
        assert token not in tok(prompt)["input_ids"], prompt


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["excited", "inhibited"])
def test_planted_neuron_ranks_first_at_last_token(tiny_llama, plain_tokenizer, sign: float) -> None:
    positive = [words + TRIGGER for words in _END_WORDS]
    negative = list(_END_WORDS)
    check_trigger_placement(plain_tokenizer, positive, negative, at_end=True)
    plant_neuron(tiny_llama, trigger_id(plain_tokenizer), sign)
    circuit = discover(tiny_llama, plain_tokenizer, positive, negative, top_k=5, reduction="last",
                       chat_template=False, batch_size=4, progress=False)
    assert len(circuit) == 5
    assert (int(circuit.layers[0]), int(circuit.neurons[0])) == (PLANT_LAYER, PLANT_NEURON)
    assert np.sign(float(circuit.deltas[0])) == sign
    assert float(circuit.scores[0]) == pytest.approx(float(circuit.deltas[0]))  # score="diff" is the signed delta
    assert abs(float(circuit.deltas[0])) > 10 * abs(float(circuit.deltas[1]))


@pytest.mark.parametrize("sign", [1.0, -1.0], ids=["excited", "inhibited"])
def test_planted_neuron_ranks_first_with_mean_reduction(tiny_llama, plain_tokenizer, sign: float) -> None:
    positive = [f"{before}{TRIGGER} {after}" for before, after in _MIDDLE]
    negative = [f"{before} {after}" for before, after in _MIDDLE]
    check_trigger_placement(plain_tokenizer, positive, negative, at_end=False)
    plant_neuron(tiny_llama, trigger_id(plain_tokenizer), sign)
    circuit = discover(tiny_llama, plain_tokenizer, positive, negative, top_k=5, reduction="mean",
                       chat_template=False, batch_size=4, progress=False)
    assert (int(circuit.layers[0]), int(circuit.neurons[0])) == (PLANT_LAYER, PLANT_NEURON)
    assert np.sign(float(circuit.deltas[0])) == sign
    assert float(circuit.scores[0]) == pytest.approx(float(circuit.deltas[0]))


def test_unplanted_model_does_not_rank_the_neuron_first(tiny_llama, plain_tokenizer) -> None:
    """Guard: without the plant, (1, 17) is not the top neuron, so the tests above test the plant."""
    positive = [words + TRIGGER for words in _END_WORDS]
    circuit = discover(tiny_llama, plain_tokenizer, positive, list(_END_WORDS), top_k=5, chat_template=False,
                       progress=False)
    assert (int(circuit.layers[0]), int(circuit.neurons[0])) != (PLANT_LAYER, PLANT_NEURON)


# --------------------------------------------------------------------------------------------- doing less work

def _count_calls(module: nn.Module, counter: dict[str, int], name: str, pre: bool = False):
    def hook(*_):
        counter[name] += 1
    counter[name] = 0
    return module.register_forward_pre_hook(hook) if pre else module.register_forward_hook(hook)


@pytest.mark.parametrize("reduction", ["last", "all", "mean"])
def test_early_stop_skips_later_layers_and_lm_head(tiny_llama, tokenizer, reduction: str) -> None:
    calls: dict[str, int] = {}
    layers = tiny_llama.model.layers
    handles = [
        _count_calls(layers[0].mlp, calls, "mlp0"),
        _count_calls(layers[1].mlp.down_proj, calls, "down1", pre=True),
        _count_calls(layers[1].mlp, calls, "mlp1_done"),
        _count_calls(layers[2].mlp, calls, "mlp2", pre=True),
        _count_calls(layers[2], calls, "block2", pre=True),
        _count_calls(layers[3].mlp, calls, "mlp3"),
        _count_calls(tiny_llama.lm_head, calls, "lm_head", pre=True),
    ]
    try:
        stats = capture_contrast(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, layers=[0, 1],
                                 reduction=reduction, batch_size=2, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    assert stats.layers == [0, 1]
    assert calls["mlp0"] > 0 and calls["down1"] > 0  # the hooks do fire for layers that run
    assert calls["mlp1_done"] == 0  # stopped at layer 1's down projection, before running it
    assert calls["mlp2"] == 0 and calls["block2"] == 0 and calls["mlp3"] == 0
    assert calls["lm_head"] == 0


def test_statistics_memory_does_not_grow_with_prompts(tiny_llama, plain_tokenizer) -> None:
    words = "the quick brown fox jumps over the lazy dog what is the capital of france".split()
    prompts = [" ".join(words[i % 7: i % 7 + 3 + i % 5]) for i in range(200)]

    def capture(n: int) -> NeuronStats:
        half = n // 2
        return capture_contrast(tiny_llama, plain_tokenizer, prompts[:half], prompts[half:n], batch_size=8,
                                progress=False)

    small, large = capture(10), capture(200)
    assert small.count.tolist() == [5, 5] and large.count.tolist() == [100, 100]
    for name in ("count", "mean", "m2"):
        a, b = getattr(small, name), getattr(large, name)
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert a.nelement() * a.element_size() == b.nelement() * b.element_size(), name
    assert large.mean.shape == (NUM_LAYERS, 2, D_FF)
    tensors = [value for value in vars(large).values() if isinstance(value, torch.Tensor)]
    assert sum(t.nelement() for t in tensors) == 2 + 2 * NUM_LAYERS * 2 * D_FF


# --------------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("positive, negative, kwargs, pattern", [
    ([], NEGATIVE_PROMPTS, {}, "positive prompt set is empty"),
    (POSITIVE_PROMPTS, [], {}, "negative prompt set is empty"),
    ([], [], {}, "empty"),
    (POSITIVE_PROMPTS + [""], NEGATIVE_PROMPTS, {}, "prompt 6 is empty"),
    (POSITIVE_PROMPTS, ["   "], {}, "is empty"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"reduction": "first"}, "unknown reduction 'first'.*last, all, mean"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"padding_side": "middle"}, "unknown padding side 'middle'"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"batch_size": 0}, "batch_size must be a positive integer, got 0"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"layers": [99]}, r"layer index 99 is out of range.*4 layers"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"layers": [-1]}, r"layer index -1 is out of range"),
    (POSITIVE_PROMPTS, NEGATIVE_PROMPTS, {"layers": []}, "no layers"),
    (POSITIVE_PROMPTS, [3], {}, "not a string"),
], ids=["no-positive", "no-negative", "both-empty", "empty-string", "blank", "reduction", "padding-side",
        "batch-size", "layer-99", "layer-negative", "no-layers", "non-string"])
def test_bad_input_raises_cna_error(tiny_llama, tokenizer, positive, negative, kwargs, pattern: str) -> None:
    with pytest.raises(CNAError, match=pattern):
        capture_contrast(tiny_llama, tokenizer, positive, negative, progress=False, **kwargs)


def test_chat_template_true_without_template_raises(tiny_llama, plain_tokenizer) -> None:
    with pytest.raises(CNAError, match="no chat template"):
        capture_contrast(tiny_llama, plain_tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, chat_template=True,
                         progress=False)


def test_length_buckets_cover_in_order_within_limits_and_beat_fixed_chunks() -> None:
    """The DP split is a partition into consecutive spans, respects both limits, and pads less than chunking."""
    from cna_fast.batching import length_buckets

    generator = np.random.default_rng(0)
    lengths = sorted(int(x) for x in generator.integers(5, 200, size=300))
    spans = length_buckets(lengths, max_rows=32, overhead_tokens=32, max_tokens=2048)
    assert spans[0][0] == 0 and spans[-1][1] == len(lengths)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(stop - start <= 32 and (stop - start == 1 or (stop - start) * lengths[stop - 1] <= 2048)
               for start, stop in spans)

    def cost(parts):
        return sum((stop - start) * lengths[stop - 1] + 32 for start, stop in parts)

    fixed = [(i, min(i + 32, len(lengths))) for i in range(0, len(lengths), 32)]
    unbounded = length_buckets(lengths, max_rows=32, overhead_tokens=32, max_tokens=10**9)
    assert cost(unbounded) < cost(fixed)  # optimal over all splits, fixed chunks included
    assert length_buckets([7], max_rows=4) == [(0, 1)] and length_buckets([], max_rows=4) == []
