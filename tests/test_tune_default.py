"""`cna tune` on the embedded default model: the French behavior, a small grid, one command."""
from __future__ import annotations

import json

import pytest

from cna_fast.circuit import Circuit
from cna_fast.cli import main
from cna_fast.evaluation import bundled_neutral_texts
from cna_fast.prompts import bundled_prompts


@pytest.mark.slow
def test_cna_tune_french_writes_circuit_table_and_plot(tmp_path, capsys):
    files = {"pos": bundled_prompts("french_questions")[:24], "neg": bundled_prompts("english_questions")[:24],
             "eval": bundled_prompts("french_heldout")[:6], "neutral": bundled_neutral_texts()[:2]}
    for name, lines in files.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(lines) + "\n")
    out, as_csv, as_json, plot = (tmp_path / name for name in ("t.safetensors", "t.csv", "t.json", "t.png"))
    code = main([str(arg) for arg in (
        "tune", "--positive", tmp_path / "pos.txt", "--negative", tmp_path / "neg.txt", "--eval-prompts",
        tmp_path / "eval.txt", "--neutral", tmp_path / "neutral.txt", "--behavior", "french", "--kl-budget", "0.5",
        "--sizes", "0.0005,0.001,0.003", "--multipliers", "0,0.5", "--scores", "diff", "--max-new-tokens", "12",
        "--out", out, "--csv", as_csv, "--json", as_json, "--plot", plot, "--quiet")])
    assert code == 0
    document = json.loads(as_json.read_text())
    chosen, search = document["chosen"], document["search"]
    circuit = Circuit.load(out)
    assert circuit.meta["multiplier"] == chosen["multiplier"] and len(circuit) == chosen["size"]
    assert chosen["kl"] <= 0.5
    assert search["baseline_rate"] >= 0.5 and chosen["behavior_rate"] < search["baseline_rate"]
    assert search["tokens_spent"] < search["full_grid_tokens"]
    assert len(as_csv.read_text().splitlines()) == 2 + 3 * 2
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "chosen: diff score" in capsys.readouterr().out
