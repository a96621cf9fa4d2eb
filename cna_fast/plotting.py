"""Matplotlib figures for circuits, written atomically as PNG."""
from __future__ import annotations

import os

from ._io import atomic_path
from .circuit import Circuit
from .errors import CNAError


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CNAError("plots need matplotlib: pip install 'cna_fast[plot]'") from None
    return plt


def plot_circuit(circuit: Circuit, path: str | os.PathLike) -> None:
    """Two panels: neurons per layer, and |score| by rank coloured by the sign of the delta."""
    plt = _pyplot()
    figure, (by_layer, by_rank) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    counts = circuit.layer_counts()
    by_layer.bar(range(len(counts)), counts, color="#4c72b0")
    by_layer.set_xlabel("layer")
    by_layer.set_ylabel("circuit neurons")
    by_layer.set_title("layer distribution")
    magnitudes = circuit.scores.abs().numpy()
    colours = ["#c44e52" if delta > 0 else "#4c72b0" for delta in circuit.deltas.tolist()]
    by_rank.bar(range(1, len(circuit) + 1), magnitudes, color=colours, width=1.0)
    by_rank.set_xlabel("rank")
    by_rank.set_ylabel(f"|{circuit.meta.get('score', 'score')}|")
    by_rank.set_title("score magnitude (red: higher on positive, blue: on negative)")
    figure.suptitle(f"{circuit.meta.get('model', '')}: {len(circuit)} neurons")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def plot_sweep(rows: list[dict], path: str | os.PathLike) -> None:
    """Quality and answer language against the multiplier, from `cna sweep` rows."""
    plt = _pyplot()
    values = sorted({row["multiplier"] for row in rows})

    def mean_of(key, predicate=lambda row: True):
        chosen = [[row for row in rows if row["multiplier"] == value] for value in values]
        return [sum(key(row) for row in group if predicate(row)) / len(group) for group in chosen]

    figure, axis = plt.subplots(figsize=(7, 4), constrained_layout=True)
    axis.plot(values, mean_of(lambda row: row["quality"]), "o-", label="quality (1 - repeated 4-grams)")
    axis.plot(values, mean_of(lambda row: row["language"] == "fr"), "s-", label="answers in French")
    axis.plot(values, mean_of(lambda row: row["language"] == "en"), "^-", label="answers in English")
    axis.set_xlabel("multiplier")
    axis.set_ylim(-0.05, 1.05)
    axis.legend()
    axis.set_title("steering sweep")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
