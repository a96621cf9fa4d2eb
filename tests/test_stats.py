"""NeuronStats against an independent numpy float64 two-pass reference."""
from __future__ import annotations

import itertools
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import cna_fast.stats.dense as stats_module
from cna_fast.circuit import Circuit
from cna_fast.errors import CNAError
from cna_fast.stats import NeuronStats

OFFSET = 1e4
BATCH_SIZES = (1, 7, 50)


def make_data(n_layers: int, n_rows: int, width: int, n_groups: int, seed: int,
              label_pool: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """float32 rows [L, R, W] = 1e4 + group shift + scaled noise; labels [R] mixed, with -1 (skipped) rows."""
    rng = np.random.default_rng(seed)
    pool = label_pool if label_pool is not None else tuple(range(-1, n_groups))
    labels = rng.choice(pool, size=n_rows)
    shift = rng.normal(0.0, 3.0, size=(n_layers, n_groups + 1, width))  # last slot: skipped rows
    scale = rng.uniform(0.5, 2.0, size=(n_layers, n_groups + 1, width))
    noise = rng.standard_normal((n_layers, n_rows, width))
    data = OFFSET + shift[:, labels] + scale[:, labels] * noise
    return data.astype(np.float32), labels.astype(np.int64)


def two_pass_truth(data: np.ndarray, labels: np.ndarray, n_groups: int) -> tuple[np.ndarray, ...]:
    """count [G], mean and M2 [L, G, W] in float64: mean first, then the sum of squared deviations."""
    values = data.astype(np.float64)
    n_layers, _, width = values.shape
    count = np.zeros(n_groups)
    mean = np.zeros((n_layers, n_groups, width))
    m2 = np.zeros((n_layers, n_groups, width))
    for group in range(n_groups):
        members = values[:, labels == group]
        count[group] = members.shape[1]
        if members.shape[1]:
            mean[:, group] = members.mean(axis=1)
            m2[:, group] = ((members - mean[:, group][:, None]) ** 2).sum(axis=1)
    return count, mean, m2


def stream(stats: NeuronStats, data: np.ndarray, labels: np.ndarray, sizes: tuple[int, ...] = BATCH_SIZES) -> None:
    """Feed rows to `stats` in uneven batches, cycling through `sizes`."""
    start = 0
    for size in itertools.cycle(sizes):
        if start >= data.shape[1]:
            break
        stop = start + size
        stats.update(torch.from_numpy(data[:, start:stop]), torch.from_numpy(labels[start:stop]))
        start = stop


def assert_matches_truth(stats: NeuronStats, data: np.ndarray, labels: np.ndarray) -> None:
    """Mean within 1e-6 of its scale (and 1e-9 of the spread), M2 within 1e-6 relative."""
    count, mean, m2 = two_pass_truth(data, labels, stats.n_groups)
    np.testing.assert_array_equal(stats.count.numpy(), count)
    mean_err = np.abs(stats.mean.numpy() - mean)
    assert mean_err.max() <= 1e-6 * np.abs(mean).max()
    # Much stricter: the error must be negligible against the per-neuron standard deviation (~1).
    assert mean_err.max() <= 1e-9
    m2_err = np.abs(stats.m2.numpy() - m2)
    populated = count > 0
    assert (m2_err[:, populated] <= 1e-6 * m2[:, populated]).all()
    assert (m2_err[:, ~populated] == 0).all()


@pytest.mark.parametrize("n_groups", [2, 3])
def test_streamed_moments_match_two_pass_truth(n_groups: int) -> None:
    """Uneven batches with mixed labels and skipped rows give float64-exact moments despite the 1e4 offset."""
    data, labels = make_data(n_layers=3, n_rows=400, width=19, n_groups=n_groups, seed=n_groups)
    assert (labels == -1).any() and all((labels == g).any() for g in range(n_groups))
    stats = NeuronStats([0, 2, 5], width=19, n_groups=n_groups)
    stream(stats, data, labels)
    assert_matches_truth(stats, data, labels)
    variance = stats.variance(ddof=1).numpy()
    for group in range(n_groups):
        expected = data[:, labels == group].astype(np.float64).var(axis=1, ddof=1)
        np.testing.assert_allclose(variance[:, group], expected, rtol=1e-6)


def test_variance_is_not_naive_float32() -> None:
    """The reference would catch catastrophic cancellation: float32 E[x^2]-E[x]^2 is far off at offset 1e4."""
    data, labels = make_data(n_layers=1, n_rows=200, width=8, n_groups=2, seed=11)
    members = data[:, labels == 0]
    naive = (members ** 2).mean(axis=1) - members.mean(axis=1) ** 2  # float32 throughout
    exact = members.astype(np.float64).var(axis=1)
    assert np.abs(naive - exact).max() > 1e-3 * exact.max()
    stats = NeuronStats([0], width=8)
    stream(stats, data, labels)
    np.testing.assert_allclose(stats.variance(ddof=0)[:, 0].numpy(), exact, rtol=1e-6)


def test_merge_of_split_streams_equals_one_stream() -> None:
    """Chan merge of two halves equals one stats fed every row (and returns self)."""
    data, labels = make_data(n_layers=2, n_rows=301, width=11, n_groups=3, seed=5)
    cut = 117
    first, second, whole = (NeuronStats([1, 3], 11, 3) for _ in range(3))
    stream(first, data[:, :cut], labels[:cut])
    stream(second, data[:, cut:], labels[cut:], sizes=(50, 7, 1))
    whole.update(torch.from_numpy(data), torch.from_numpy(labels))
    assert first.merge(second) is first
    torch.testing.assert_close(first.count, whole.count, rtol=0, atol=0)
    torch.testing.assert_close(first.mean, whole.mean, rtol=1e-9, atol=0)
    torch.testing.assert_close(first.m2, whole.m2, rtol=1e-9, atol=0)
    assert_matches_truth(first, data, labels)


def test_merge_into_empty_stats_copies_other() -> None:
    """Merging into fresh statistics (count 0) reproduces the other side exactly."""
    data, labels = make_data(n_layers=2, n_rows=60, width=5, n_groups=2, seed=8)
    filled = NeuronStats([0, 1], 5)
    stream(filled, data, labels)
    empty = NeuronStats([0, 1], 5).merge(filled)
    assert torch.equal(empty.count, filled.count)
    torch.testing.assert_close(empty.mean, filled.mean, rtol=1e-15, atol=0)
    torch.testing.assert_close(empty.m2, filled.m2, rtol=1e-15, atol=0)


def test_group_without_rows_stays_empty() -> None:
    """A group no row belongs to keeps count 0, mean 0, M2 0 and NaN variance."""
    data, labels = make_data(n_layers=2, n_rows=120, width=6, n_groups=3, seed=3, label_pool=(-1, 0, 1))
    stats = NeuronStats([0, 1], 6, n_groups=3)
    stream(stats, data, labels)
    assert stats.count[2] == 0
    assert (stats.mean[:, 2] == 0).all() and (stats.m2[:, 2] == 0).all()
    assert torch.isnan(stats.variance(ddof=1)[:, 2]).all()
    assert torch.isnan(stats.variance(ddof=0)[:, 2]).all()
    assert_matches_truth(stats, data, labels)


def test_only_skipped_rows_change_nothing() -> None:
    """A batch whose labels are all -1 is a no-op."""
    stats = NeuronStats([0], 4)
    stats.update(torch.randn(1, 5, 4), torch.full((5,), -1))
    assert (stats.count == 0).all() and (stats.mean == 0).all() and (stats.m2 == 0).all()


def test_variance_nan_when_too_few_rows() -> None:
    """ddof=1 variance is NaN for groups with 0 or 1 rows, finite from 2 rows; ddof=0 is 0 for 1 row."""
    stats = NeuronStats([0, 1], 3, n_groups=3)
    rows = torch.tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 9.0, 11.0]]]).expand(2, -1, -1)
    stats.update(rows, torch.tensor([0, 1, 1]))  # group 0: one row, group 1: two rows, group 2: none
    variance = stats.variance(ddof=1)
    assert torch.isnan(variance[:, 0]).all() and torch.isnan(variance[:, 2]).all()
    expected = torch.tensor([4.5, 8.0, 12.5], dtype=torch.float64)  # (b - a)^2 / 2
    torch.testing.assert_close(variance[:, 1], expected.expand(2, -1), rtol=1e-12, atol=0)
    assert (stats.variance(ddof=0)[:, 0] == 0).all()
    assert torch.isnan(stats.std(ddof=1)[:, 0]).all()


def test_save_load_round_trip(tmp_path: Path) -> None:
    """Tensors come back bit-identical; layers, width, groups and meta are preserved."""
    data, labels = make_data(n_layers=3, n_rows=90, width=7, n_groups=3, seed=1)
    meta = {"model": "tiny", "reduction": "last", "nested": {"layers": [0, 4, 9], "frac": 0.001}}
    stats = NeuronStats([0, 4, 9], 7, n_groups=3, meta=meta)
    stream(stats, data, labels)
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = NeuronStats.load(path)
    assert loaded.layers == [0, 4, 9] and loaded.width == 7 and loaded.n_groups == 3
    for name in ("count", "mean", "m2"):
        original, restored = getattr(stats, name), getattr(loaded, name)
        assert restored.dtype == torch.float64 and torch.equal(original, restored), name
    assert loaded.meta == meta
    assert os.listdir(tmp_path) == ["stats.safetensors"]  # no temporary file left behind


def test_load_rejects_other_safetensors(tmp_path: Path) -> None:
    """Valid safetensors files without the stats header (foreign, bare, a circuit) are not statistics."""
    path = tmp_path / "other.safetensors"
    save_file({"mean": torch.zeros(1, 2, 3, dtype=torch.float64)}, str(path), metadata={"format": "something/1"})
    with pytest.raises(CNAError):
        NeuronStats.load(path)
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(CNAError):
        NeuronStats.load(bare)
    circuit_path = tmp_path / "circuit.safetensors"
    Circuit(layers=[0], neurons=[1], scores=[1.0], deltas=[1.0], mean_positive=[1.0], mean_negative=[0.0],
            std_positive=[1.0], std_negative=[1.0]).save(circuit_path)
    with pytest.raises(CNAError):
        NeuronStats.load(circuit_path)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CNAError):
        NeuronStats.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("content", [b"", bytes(range(7, 71)), b"not a safetensors file at all"],
                         ids=["empty", "binary", "text"])
def test_load_rejects_corrupt_file(tmp_path: Path, content: bytes) -> None:
    """Random or truncated bytes give CNAError, not a raw safetensors exception."""
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(content)
    with pytest.raises(CNAError):
        NeuronStats.load(path)


def test_save_to_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(CNAError):
        NeuronStats([0], 2).save(tmp_path / "absent" / "stats.safetensors")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("other", [
    lambda: NeuronStats([0, 1], 5, 3),   # different groups
    lambda: NeuronStats([0, 2], 4, 3),   # different layers
    lambda: NeuronStats([0, 1], 4, 3),   # different width
])
def test_merge_mismatched_shapes(other) -> None:
    with pytest.raises(CNAError):
        NeuronStats([0, 1], 5, 2).merge(other())


def test_list_form_equals_stacked_form() -> None:
    """update() with a list of per-layer [R, W] tensors equals the stacked [L, R, W] tensor."""
    data, labels = make_data(n_layers=4, n_rows=150, width=9, n_groups=2, seed=21)
    stacked, listed = NeuronStats(range(4), 9), NeuronStats(range(4), 9)
    for start in range(0, 150, 50):
        rows = torch.from_numpy(data[:, start:start + 50])
        batch_labels = torch.from_numpy(labels[start:start + 50])
        stacked.update(rows, batch_labels)
        listed.update(list(rows.unbind(0)), batch_labels)
    for name in ("count", "mean", "m2"):
        assert torch.equal(getattr(stacked, name), getattr(listed, name)), name
    assert_matches_truth(listed, data, labels)


@pytest.mark.parametrize("limit", [1, 2 * 64 * 13])
def test_internal_chunking_matches_unchunked(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """With a tiny _UPDATE_ELEMENTS the layers are reduced in several chunks; results and count are unchanged."""
    data, labels = make_data(n_layers=5, n_rows=64, width=13, n_groups=3, seed=4)
    rows, row_labels = torch.from_numpy(data), torch.from_numpy(labels)
    whole = NeuronStats(range(5), 13, 3)
    whole.update(rows, row_labels)  # default limit: one chunk
    monkeypatch.setattr(stats_module, "_UPDATE_ELEMENTS", limit)  # 1 or 2 layers per chunk (5 = 2 + 2 + 1)
    chunked = NeuronStats(range(5), 13, 3)
    chunked.update(rows, row_labels)
    chunked.update(list(rows.unbind(0)), row_labels)
    whole.update(rows, row_labels)
    assert torch.equal(chunked.count, whole.count)
    torch.testing.assert_close(chunked.mean, whole.mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(chunked.m2, whole.m2, rtol=1e-12, atol=0)
    doubled = np.concatenate([data, data], axis=1), np.concatenate([labels, labels])
    assert_matches_truth(chunked, *doubled)


def test_update_rejects_wrong_shapes() -> None:
    stats = NeuronStats([0, 1], 4)
    with pytest.raises(ValueError):
        stats.update(torch.zeros(3, 2, 4), torch.zeros(2, dtype=torch.long))  # 3 layers, 2 tracked
    with pytest.raises(ValueError):
        stats.update(torch.zeros(2, 2, 5), torch.zeros(2, dtype=torch.long))  # width 5, 4 tracked
