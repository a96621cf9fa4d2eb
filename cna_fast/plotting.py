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
