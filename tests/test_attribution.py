"""Scores, selection and filters against independent numpy formulas; universal filter on a tiny Llama."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cna_fast import get_adapter
from cna_fast.attribution import DEFAULT_TOP_FRAC, attribute, resolve_top_k, score_neurons, select_neurons
from cna_fast.pipeline import UniversalFilter, discover
from cna_fast.errors import CNAError
from cna_fast.stats import NEGATIVE, POSITIVE, NeuronStats


def stats_from_samples(positive: np.ndarray, negative: np.ndarray, layers: list[int] | None = None) -> NeuronStats:
    """NeuronStats of raw samples positive [L, Np, W] and negative [L, Nn, W], streamed in mixed batches."""
    n_layers, n_pos, width = positive.shape
    layers = list(range(n_layers)) if layers is None else layers
    rows = np.concatenate([positive, negative], axis=1)
    labels = np.array([POSITIVE] * n_pos + [NEGATIVE] * negative.shape[1])
    order = np.random.default_rng(0).permutation(len(labels))  # mix the sides within batches
    stats = NeuronStats(layers, width)
    for start in range(0, len(order), 8):
        take = order[start:start + 8]
        stats.update(torch.from_numpy(rows[:, take]), torch.from_numpy(labels[take]))
    return stats


def random_contrast(n_layers: int, width: int, n_pos: int, n_neg: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Samples with per-neuron known means and unequal spreads on each side."""
    rng = np.random.default_rng(seed)
    mu_pos = rng.normal(0, 2, size=(n_layers, 1, width))
    mu_neg = rng.normal(0, 2, size=(n_layers, 1, width))
    positive = mu_pos + rng.uniform(0.5, 3.0, size=(n_layers, 1, width)) * rng.standard_normal((n_layers, n_pos, width))
    negative = mu_neg + rng.uniform(0.5, 3.0, size=(n_layers, 1, width)) * rng.standard_normal((n_layers, n_neg, width))
    return positive, negative


def numpy_scores(positive: np.ndarray, negative: np.ndarray) -> dict[str, np.ndarray]:
    """diff, Welch t and Cohen's d (pooled std) per neuron [L, W], straight from the samples."""
    n_pos, n_neg = positive.shape[1], negative.shape[1]
    diff = positive.mean(axis=1) - negative.mean(axis=1)
    var_pos, var_neg = positive.var(axis=1, ddof=1), negative.var(axis=1, ddof=1)
    welch = diff / np.sqrt(var_pos / n_pos + var_neg / n_neg)
    pooled = np.sqrt(((n_pos - 1) * var_pos + (n_neg - 1) * var_neg) / (n_pos + n_neg - 2))
    return {"diff": diff, "t": welch, "d": diff / pooled}


@pytest.mark.parametrize("score", ["diff", "t", "d"])
def test_scores_match_numpy(score: str) -> None:
    positive, negative = random_contrast(3, 20, n_pos=13, n_neg=29, seed=1)
    stats = stats_from_samples(positive, negative)
    got = score_neurons(stats, score).numpy()
    np.testing.assert_allclose(got, numpy_scores(positive, negative)[score], rtol=1e-10, atol=1e-12)


def test_t_and_d_are_distinct_formulas() -> None:
    """With unequal sizes and spreads, Welch t is not pooled d times a constant: each test pins one formula."""
    positive, negative = random_contrast(1, 50, n_pos=6, n_neg=40, seed=2)
    truth = numpy_scores(positive, negative)
    ratio = truth["t"] / truth["d"]
    assert ratio.std() > 0.05 * abs(ratio.mean())
    stats = stats_from_samples(positive, negative)
    assert not np.allclose(score_neurons(stats, "t").numpy(), score_neurons(stats, "d").numpy() * ratio.mean())


def test_attribute_fields_match_samples() -> None:
    """The circuit carries the selected neurons' deltas, means and ddof=1 stds from the samples."""
    positive, negative = random_contrast(3, 16, n_pos=9, n_neg=11, seed=3)
    circuit = attribute(stats_from_samples(positive, negative, layers=[2, 5, 7]), top_k=10, score="t")
    rows = np.array([[2, 5, 7].index(layer) for layer in circuit.layers.tolist()])
    cols = circuit.neurons.numpy()
    truth = numpy_scores(positive, negative)
    np.testing.assert_allclose(circuit.scores.numpy(), truth["t"][rows, cols], rtol=1e-10)
    np.testing.assert_allclose(circuit.deltas.numpy(), truth["diff"][rows, cols], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(circuit.mean_positive.numpy(), positive.mean(axis=1)[rows, cols], rtol=1e-10)
    np.testing.assert_allclose(circuit.mean_negative.numpy(), negative.mean(axis=1)[rows, cols], rtol=1e-10)
    np.testing.assert_allclose(circuit.std_positive.numpy(), positive.std(axis=1, ddof=1)[rows, cols], rtol=1e-10)
    np.testing.assert_allclose(circuit.std_negative.numpy(), negative.std(axis=1, ddof=1)[rows, cols], rtol=1e-10)
    # The ten largest |t| over all layers, in order.
    expected = np.argsort(-np.abs(truth["t"]).ravel(), kind="stable")[:10]
    assert (rows * 16 + cols).tolist() == expected.tolist()
    assert circuit.meta["n_positive"] == 9 and circuit.meta["n_negative"] == 11 and circuit.meta["top_k"] == 10


def planted_stats(layers: list[int] = [0, 1, 2, 3], width: int = 8, seed: int = 0) -> NeuronStats:
    """Small noise everywhere; layer-row 2 neuron 5: -10 (positive lower); layer-row 0 neuron 3: +4."""
    rng = np.random.default_rng(seed)
    positive = rng.normal(0, 0.1, size=(len(layers), 10, width))
    negative = rng.normal(0, 0.1, size=(len(layers), 10, width))
    negative[2, :, 5] += 10.0
    positive[0, :, 3] += 4.0
    return stats_from_samples(positive, negative, layers)


def test_global_ranking_by_magnitude() -> None:
    """A big negative difference in layer 2 outranks a smaller positive one in layer 0."""
    circuit = attribute(planted_stats(), top_k=2)
    assert circuit.layers.tolist() == [2, 0]
    assert circuit.neurons.tolist() == [5, 3]
    assert circuit.scores[0] == pytest.approx(-10.0, abs=0.2)
    assert circuit.scores[1] == pytest.approx(4.0, abs=0.2)


def test_ranking_reports_model_layer_ids() -> None:
    """Stats over layers [3, 6, 10, 11]: circuit layers are the model's ids, not row numbers."""
    circuit = attribute(planted_stats(layers=[3, 6, 10, 11]), top_k=2)
    assert circuit.layers.tolist() == [10, 3]


def test_select_neurons_ties_and_nan() -> None:
    """Equal magnitudes go to the lower flat index; NaN ranks last; ineligible entries never appear."""
    scores = torch.tensor([[1.0, -3.0, float("nan")], [3.0, 2.0, -0.5]])
    assert select_neurons(scores, 5).tolist() == [1, 3, 4, 0, 5]
    eligible = torch.tensor([[True, False, True], [True, True, True]])
    assert select_neurons(scores, 5, eligible).tolist() == [3, 4, 0, 5, 2]


@pytest.mark.parametrize("frac, total, expected", [
    (0.001, 46080, 46), (0.001, 384, 1), (1e-6, 100, 1), (0.01, 1000, 10), (0.003, 1000, 3), (1.0, 7, 7),
    (0.3, 10, 3),
])
def test_top_frac_resolves_to_rounded_count(frac: float, total: int, expected: int) -> None:
    assert resolve_top_k(None, frac, total, total) == expected == max(1, round(frac * total))


def test_top_frac_default_and_total_neurons() -> None:
    """top_frac None means 0.1%; attribute's total_neurons drives the fraction."""
    assert resolve_top_k(None, None, 46080, 46080) == 46
    assert DEFAULT_TOP_FRAC == 0.001
    stats = planted_stats(width=50)  # 200 captured neurons
    assert len(attribute(stats, top_frac=0.05)) == 10
    assert len(attribute(stats, top_frac=0.05, total_neurons=1000)) == 50
    assert len(attribute(stats)) == 1  # 0.1% of 200 rounds to 0, at least 1


def test_top_k_overrides_top_frac() -> None:
    assert resolve_top_k(3, 0.5, 100, 100) == 3
    assert len(attribute(planted_stats(), top_k=3, top_frac=0.9)) == 3


@pytest.mark.parametrize("top_k, top_frac", [
    (0, None), (-2, None), (33, None), (2.5, None), (True, None), (None, 0.0), (None, 1.5), (None, -0.1),
])
def test_resolve_top_k_errors(top_k, top_frac) -> None:
    with pytest.raises(CNAError):
        resolve_top_k(top_k, top_frac, 40, 32)


def test_top_k_counts_only_eligible_neurons() -> None:
    """4 layers x 8 with one excluded layer leaves 24 selectable neurons."""
    stats = planted_stats()
    assert len(attribute(stats, top_k=24, exclude_layers=[1])) == 24
    with pytest.raises(CNAError):
        attribute(stats, top_k=25, exclude_layers=[1])


def test_excluded_layers_are_never_selected() -> None:
    """Even the strongest neuron (layer 2) is skipped; selecting every eligible neuron never reaches layer 2."""
    stats = planted_stats()
    top = attribute(stats, top_k=1, exclude_layers=[2])
    assert top.layers.tolist() == [0] and top.neurons.tolist() == [3]
    everything = attribute(stats, top_k=24, exclude_layers=[2])
    assert 2 not in everything.layers.tolist()
    assert sorted(set(everything.layers.tolist())) == [0, 1, 3]
    assert len(set(zip(everything.layers.tolist(), everything.neurons.tolist()))) == 24


def test_universal_mask_excludes_neurons() -> None:
    stats = planted_stats()
    universal = torch.zeros(4, 8, dtype=torch.bool)
    universal[2, 5] = True
    circuit = attribute(stats, top_k=1, universal=universal)
    assert (circuit.layers.tolist(), circuit.neurons.tolist()) == ([0], [3])
    all_eligible = attribute(stats, top_k=31, universal=universal)
    assert (2, 5) not in set(zip(all_eligible.layers.tolist(), all_eligible.neurons.tolist()))
    assert all_eligible.meta["universal_removed"] == 1
    with pytest.raises(CNAError):
        attribute(stats, top_k=32, universal=universal)


@pytest.mark.parametrize("score", ["t", "d"])
@pytest.mark.parametrize("n_pos, n_neg", [(1, 1), (1, 5), (5, 1)])
def test_standardized_scores_need_two_per_side(score: str, n_pos: int, n_neg: int) -> None:
    positive, negative = random_contrast(2, 4, n_pos=n_pos, n_neg=n_neg, seed=4)
    stats = stats_from_samples(positive, negative)
    with pytest.raises(CNAError):
        score_neurons(stats, score)
    with pytest.raises(CNAError):
        attribute(stats, top_k=1, score=score)
    diff = positive.mean(axis=1) - negative.mean(axis=1)
    np.testing.assert_allclose(score_neurons(stats, "diff").numpy(), diff, rtol=1e-12, atol=1e-12)


def test_unknown_score() -> None:
    stats = planted_stats()
    for bad in ("delta", "T", ""):
        with pytest.raises(CNAError):
            score_neurons(stats, bad)
        with pytest.raises(CNAError):
            attribute(stats, top_k=1, score=bad)


# ---------------------------------------------------------------- universal filter on a tiny Llama

PLANT_LAYER, PLANT_NEURON, CONST_DIM = 1, 11, 7
POSITIVE_PROMPTS = ["what is the capital of france", "how do i bake bread", "explain photosynthesis to a child"]
NEGATIVE_PROMPTS = ["quelle est la capitale de la france", "comment faire du pain", "zebra stripes on the savanna"]


def plant_universal_neuron(model) -> None:
    """Make (PLANT_LAYER, PLANT_NEURON) fire hugely on every token.

    Every token embedding gets the same value in hidden dimension CONST_DIM, so the normed MLP input
    is large and positive there for any text; the neuron's gate and up rows read only that dimension.
    """
    with torch.no_grad():
        model.model.embed_tokens.weight[:, CONST_DIM] = 0.1
        mlp = model.model.layers[PLANT_LAYER].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[PLANT_NEURON] = 0.0
            proj.weight[PLANT_NEURON, CONST_DIM] = 10.0


def last_token_activations(model, tokenizer, prompts: list[str], layer: int) -> torch.Tensor:
    """Down-projection inputs [prompts, d_ff] at the last chat-template token, via a plain forward hook."""
    captured: list[torch.Tensor] = []
    handle = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(
        lambda module, args: captured.append(args[0][0, -1].detach().clone()))
    try:
        with torch.no_grad():
            for prompt in prompts:
                text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                     add_generation_prompt=True)
                model(**tokenizer(text, return_tensors="pt", add_special_tokens=False))
    finally:
        handle.remove()
    return torch.stack(captured)


def test_universal_filter_finds_and_discover_skips_planted_neuron(tiny_llama, tokenizer) -> None:
    """The filter flags a neuron that is huge on every prompt; discover keeps it only when unfiltered."""
    plant_universal_neuron(tiny_llama)
    acts = last_token_activations(tiny_llama, tokenizer, POSITIVE_PROMPTS + NEGATIVE_PROMPTS, PLANT_LAYER)
    others = torch.cat([acts[:, :PLANT_NEURON], acts[:, PLANT_NEURON + 1:]], dim=1)
    assert (acts[:, PLANT_NEURON].abs() > 100 * others.abs().max()).all()  # the plant works as intended

    universal = UniversalFilter().find(tiny_llama, tokenizer, progress=False)
    assert universal.shape == (4, 96) and universal.dtype == torch.bool
    assert universal[PLANT_LAYER, PLANT_NEURON]
    assert int(universal.sum()) <= 8  # a handful at most, not a blanket mask

    common = dict(top_k=5, progress=False)
    unfiltered = discover(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, universal_filter=False, **common)
    planted = (PLANT_LAYER, PLANT_NEURON)
    assert planted in set(zip(unfiltered.layers.tolist(), unfiltered.neurons.tolist()))
    assert unfiltered.meta["universal_filter"] is False

    filtered = discover(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, universal_filter=True, **common)
    assert planted not in set(zip(filtered.layers.tolist(), filtered.neurons.tolist()))
    assert filtered.meta["universal_filter"] is True and filtered.meta["universal_removed"] >= 1

    # A precomputed mask and a filter run on a subset of layers give the same exclusion.
    masked = discover(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, universal_filter=universal, **common)
    assert planted not in set(zip(masked.layers.tolist(), masked.neurons.tolist()))
    subset = discover(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, universal_filter=True,
                      exclude_layers=[0], **common)
    assert planted not in set(zip(subset.layers.tolist(), subset.neurons.tolist()))
    assert 0 not in subset.layers.tolist()
    assert get_adapter(tiny_llama).architecture() == filtered.architecture


def test_universal_mask_with_wrong_shape_is_rejected(tiny_llama, tokenizer) -> None:
    with pytest.raises(CNAError):
        discover(tiny_llama, tokenizer, POSITIVE_PROMPTS, NEGATIVE_PROMPTS, top_k=1, progress=False,
                 universal_filter=torch.zeros(3, 96, dtype=torch.bool))
