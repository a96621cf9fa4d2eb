"""Matplotlib figures for the CLI: circuits, sweeps, evaluations and searches, written atomically as PNG;
the evaluation's HTML report."""
from __future__ import annotations

import os

from .._io import atomic_path, write_text_atomic
from ..circuit import Circuit
from ..errors import CNAError


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
    figure.suptitle(f"{circuit.meta.get('model', '')}: {len(circuit)} neurons", parse_math=False)  # '$' is text
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def plot_sweep(rows: list[dict], path: str | os.PathLike, behavior: str = "behavior") -> None:
    """Behavior rate and quality against the multiplier, from `cna sweep` rows."""
    plt = _pyplot()
    values = sorted({row["multiplier"] for row in rows})

    def mean_of(key):
        groups = [[row[key] for row in rows if row["multiplier"] == value] for value in values]
        return [sum(group) / len(group) for group in groups]

    figure, axis = plt.subplots(figsize=(7, 4), constrained_layout=True)
    axis.plot(values, mean_of("behavior"), "s-", label=f"{behavior} rate")
    axis.plot(values, mean_of("quality"), "o-", label="quality (1 - repeated 4-grams)")
    axis.set_xlabel("multiplier")
    axis.set_ylim(-0.05, 1.05)
    axis.legend()
    axis.set_title("steering sweep")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


_METHOD_STYLE = {"cna": ("o-", "#c44e52", "CNA (circuit)"), "caa": ("s--", "#4c72b0", "CAA (residual)"),
                 "random": ("^:", "#8c8c8c", "random circuit"),
                 "ablation": ("D-.", "#55a868", "directional ablation (residual)")}


def _evaluation_figure(result, circuit: Circuit, behavior: str):
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(11, 7.5), constrained_layout=True)
    panels = ((axes[0][0], "behavior_rate", f"{behavior} rate"),
              (axes[0][1], "quality", "quality (1 - repeated 4-grams)"),
              (axes[1][0], "kl", "next-token KL vs unsteered (nats)"))
    for axis, key, label in panels:
        for method in dict.fromkeys(row["method"] for row in result.metrics):
            rows = [row for row in result.metrics if row["method"] == method]
            style, colour, name = _METHOD_STYLE.get(method, ("x-", None, method))  # unknown: matplotlib's colour
            values = [float("nan") if row[key] is None else row[key] for row in rows]  # None: not measured
            axis.plot([row["strength"] for row in rows], values, style, color=colour, label=name)
        axis.set_xlabel("strength (1 = unsteered; CAA alpha = strength - 1)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8)
    counts = circuit.layer_counts()
    axes[1][1].bar(range(len(counts)), counts, color="#c44e52")
    axes[1][1].set_xlabel("layer")
    axes[1][1].set_ylabel("circuit neurons")
    figure.suptitle(f"{circuit.meta.get('model', '')}: {len(circuit)}-neuron circuit vs baselines", parse_math=False)
    return plt, figure


def plot_evaluation(result, circuit: Circuit, path: str | os.PathLike, behavior: str = "behavior") -> None:
    """Behavior rate, quality and KL against strength for each method, and the circuit's layers."""
    plt, figure = _evaluation_figure(result, circuit, behavior)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)


def write_html_report(result, circuit: Circuit, path: str | os.PathLike, behavior: str = "behavior",
                      samples: int = 3) -> None:
    """A self-contained HTML page: the plot (embedded), the metrics table and sample generations."""
    import base64
    import html
    import io

    plt, figure = _evaluation_figure(result, circuit, behavior)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    image = base64.b64encode(buffer.getvalue()).decode()
    columns = ["method", "strength", "behavior_rate", "quality", "answer_ppl", "kl", "perplexity", "mc_accuracy"]

    def cell(value) -> str:
        return f"<td>{html.escape(f'{value:.4g}' if isinstance(value, float) else str(value))}</td>"

    table = "".join("<tr>" + "".join(cell(row[c]) for c in columns) + "</tr>" for row in result.metrics)
    shown: dict[tuple, int] = {}
    examples = []
    for item in result.generations:
        key = (item["method"], item["strength"])
        if shown.get(key, 0) < samples:
            shown[key] = shown.get(key, 0) + 1
            examples.append(f"<tr><td>{item['method']}</td><td>{item['strength']:g}</td>"
                            f"<td>{html.escape(item['prompt'])}</td><td>{html.escape(item['output'])}</td></tr>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>cna_fast evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;vertical-align:top}}</style></head><body>
<h1>{html.escape(str(circuit.meta.get('model', '')))}: {len(circuit)}-neuron circuit</h1>
<p>Behavior: {html.escape(behavior)}. Strength is the multiplier for CNA and the random circuit; CAA adds
(strength - 1) times the MLP-output difference; directional ablation keeps strength times the residual stream's
component along its direction (0 removes it); so strength 1 is the unsteered model for every method.</p>
<img src="data:image/png;base64,{image}" style="max-width:100%">
<h2>Metrics</h2><table><tr>{''.join(f'<th>{c}</th>' for c in columns)}</tr>{table}</table>
<h2>Sample generations</h2><table><tr><th>method</th><th>strength</th><th>prompt</th><th>output</th></tr>
{''.join(examples)}</table></body></html>
"""
    write_text_atomic(path, page)


def plot_tune(result, path: str | os.PathLike) -> None:
    """Behavior rate against KL for every setting `cna tune` measured: the Pareto front, the KL
    budget and the chosen setting marked (a `cna_fast.search.TuneResult`)."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 5), constrained_layout=True)
    rows = [row for row in result.table if row["kl"] is not None]
    colours = {"diff": "#4c72b0", "t": "#dd8452", "d": "#55a868"}
    for score, colour in colours.items():
        for rate, marker, alpha, label in (("screen_rate", "x", 0.35, "screened"), ("behavior_rate", "o", 0.9, "full")):
            chosen = [row for row in rows if row["score"] == score and row[rate] is not None
                      and (rate == "behavior_rate") == row["stage"].endswith("final")]
            if chosen:
                axis.scatter([row["kl"] for row in chosen], [row[rate] for row in chosen], marker=marker,
                             color=colour, alpha=alpha, label=f"{score}, {label}")
    front = [row for row in result.pareto if row["kl"] is not None]
    axis.plot([row["kl"] for row in front], [row["behavior_rate"] for row in front], "-", color="#c44e52",
              drawstyle="steps-post", label="Pareto front")
    baseline = result.baseline
    axis.scatter([0.0], [baseline.behavior_rate], marker="s", color="black", label="unsteered", zorder=3)
    axis.axvline(result.kl_budget, color="grey", linestyle="--", label=f"KL budget {result.kl_budget:g}")
    if result.chosen is not None:
        chosen = result.chosen
        axis.scatter([chosen.kl], [chosen.behavior_rate], marker="*", s=260, color="#c44e52", edgecolor="black",
                     zorder=4, label=f"chosen: {chosen.score} top {chosen.size}, x{chosen.multiplier:g}")
    axis.set_xscale("symlog", linthresh=1e-3)
    axis.set_xlabel("KL on neutral text (nats)")
    axis.set_ylabel(f"{result.behavior} rate")
    axis.set_ylim(-0.05, 1.05)
    axis.legend(fontsize=8, loc="best")
    axis.set_title(f"circuit search ({result.goal} {result.behavior}): {result.tokens_spent:,} tokens generated, "
                   f"{result.tokens_spent / result.full_grid_tokens:.0%} of the full grid")
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
