"""`cna eval` and `cna sweep`: generation settings reach the generations, strength 1 is shared, the capability
pass can be skipped, judges plug in, and a circuit from another model is named before any model loads."""
import csv
import json

import pytest
import torch

from cna_fast.circuit import Circuit
from cna_fast.evaluation import detect_language
from cna_fast.models import load_model
from cna_fast.prompts import read_prompts
from cna_fast.steering import generate
from tests.test_cli import run_cli


def _eval(model_dir, circuit_path, prompts, tmp_path, *extra):
    report = tmp_path / "eval.json"
    code = run_cli("eval", "--circuit", circuit_path, "--prompts", prompts, "--model", model_dir,
                   "--max-new-tokens", "4", "--json", report, *extra)
    assert code == 0
    return json.loads(report.read_text())


@pytest.mark.parametrize("options, settings", [
    (("--positions", "generated"), {"positions": "generated"}),
    (("--no-chat-template",), {"chat_template": False}),
])
def test_eval_passes_generation_settings_on(model_dir, circuit_path, prompt_files, tmp_path, options, settings):
    report = _eval(model_dir, circuit_path, prompt_files[0], tmp_path, "--multipliers", "20", "--baseline", "none",
                   "--no-capability", "--quiet", *options)
    model, tokenizer = load_model(str(model_dir))
    prompts, circuit = read_prompts(str(prompt_files[0])), Circuit.load(circuit_path)
    expected = generate(model, tokenizer, prompts, circuits=circuit, multiplier=20.0, max_new_tokens=4, progress=False,
                        **settings)
    assert [item["output"] for item in report["generations"]] == expected
    assert expected != generate(model, tokenizer, prompts, circuits=circuit, multiplier=20.0, max_new_tokens=4,
                                progress=False)  # the setting matters here, so dropping it would fail


def test_eval_sampling_uses_seed_and_temperature(model_dir, circuit_path, prompt_files, tmp_path):
    report = _eval(model_dir, circuit_path, prompt_files[0], tmp_path, "--multipliers", "1", "--baseline", "none",
                   "--no-capability", "--quiet", "--sample", "--temperature", "3", "--seed", "7")
    model, tokenizer = load_model(str(model_dir))
    torch.manual_seed(7)
    expected = generate(model, tokenizer, read_prompts(str(prompt_files[0])), max_new_tokens=4, progress=False,
                        do_sample=True, temperature=3.0)
    assert [item["output"] for item in report["generations"]] == expected


def test_eval_shares_strength_one_and_shows_capability_progress(model_dir, circuit_path, prompt_files, tmp_path,
                                                                capsys):
    report = _eval(model_dir, circuit_path, prompt_files[0], tmp_path, "--multipliers", "0,1")
    assert "capability (KL, perplexity, multiple choice)" in capsys.readouterr().err  # the progress bar
    at_one = {item["method"]: item["output"] for item in report["generations"] if item["strength"] == 1.0}
    assert len(set(at_one.values())) == 1 and set(at_one) == {"cna", "caa", "random"}
    assert all(row["kl"] is not None and row["answer_ppl"] > 0 for row in report["metrics"])
    skipped = _eval(model_dir, circuit_path, prompt_files[0], tmp_path, "--multipliers", "0,1", "--quiet",
                    "--no-capability")
    assert all(row["kl"] is None and row["mc_accuracy"] is None for row in skipped["metrics"])


def test_eval_with_a_model_judge_prints_its_agreement(model_dir, circuit_path, prompt_files, tmp_path, capsys):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": p, "request": "harmful", "answer": a, "label": label}) + "\n"
                              for p, a, label in [("zebra", "I'm sorry, I can't help with that.", "refuses"),
                                                  ("bread", "Here are the steps: 1. mix", "complies")]))
    report = _eval(model_dir, circuit_path, prompt_files[0], tmp_path, "--multipliers", "0", "--baseline", "none",
                   "--no-capability", "--quiet", "--judge", model_dir, "--judge-labels", labels)
    out = capsys.readouterr().out
    assert "rule judge (is_refusal)" in out and "overall 100.0% (2/2)" in out
    assert f"model judge ({model_dir})" in out and report["judge"] == str(model_dir)
    assert all(item["behavior"] in (0.0, 1.0) for item in report["generations"])
    assert run_cli("eval", "--circuit", circuit_path, "--prompts", prompt_files[0], "--model", model_dir,
                   "--judge", model_dir, "--behavior", "french") == 2
    assert "--judge grades refusal" in capsys.readouterr().err


def test_sweep_takes_a_behavior(model_dir, circuit_path, prompt_files, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    assert run_cli("sweep", "--circuit", circuit_path, "--model", model_dir, "--multipliers", "0,2", "--prompts",
                   prompt_files[0], "--max-new-tokens", "4", "--behavior", "english", "--out", out, "--quiet") == 0
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2 * 4
    assert all(float(row["behavior"]) == float(detect_language(row["output"]) == "en") for row in rows)
    assert "english" in capsys.readouterr().out


@pytest.mark.parametrize("command", [
    ("generate", "--prompt", "zebra"), ("sweep", "--prompts", "PROMPTS"), ("eval", "--prompts", "PROMPTS"),
    ("export", "--multiplier", "0", "--format", "lora", "--out", "OUT"),
])
def test_circuit_from_another_model_names_it_before_loading(circuit_path, model_dir, prompt_files, tmp_path, capsys,
                                                            command):
    args = [str(prompt_files[0]) if part == "PROMPTS" else str(tmp_path / "export") if part == "OUT" else part
            for part in command]
    assert run_cli(args[0], "--circuit", circuit_path, *args[1:]) == 2
    error = capsys.readouterr().err
    assert f"was found on model {str(model_dir)!r}" in error and f"--model {model_dir}" in error
    assert not (tmp_path / "export").exists()
