"""Circuit search: the planted two-template behavior, shells-as-rows batching, batched KL, saved statistics."""
from __future__ import annotations

import json

import pytest
import torch

from cna_fast import attribute, capture_contrast, generate, get_adapter, steer, tune
from cna_fast.circuit import Circuit
from cna_fast.errors import CNAError
from cna_fast.evaluation import behavior_rate, capability_metrics
from cna_fast.stats import NeuronStats
from cna_fast.search import (
    batched_kl,
    candidate_rows,
    disjoint_shells,
    multiplier_grid,
    size_grid,
)
from cna_fast.search import Candidate
from cna_fast.search.tuning import screen_size
from tests.planted_templates import (
    A_NEURONS,
    B_NEURONS,
    EVAL,
    NEGATIVE,
    NEUTRAL,
    POSITIVE,
    build_planted_model,
    shows_template,
)
from tests.test_moe import PLANT_EXPERT, PLANT_NEURON, plant_zebra_neuron
from tests.tiny import build_tiny_model
from tests.tiny_moe import build_tiny_moe

SEARCH = {"behavior": shows_template, "neutral": NEUTRAL, "max_new_tokens": 4, "chat_template": False,
          "progress": False}


@pytest.fixture(scope="module")
def planted(plain_tokenizer):
    model = build_planted_model(len(plain_tokenizer))
    stats = capture_contrast(model, plain_tokenizer, POSITIVE, NEGATIVE, chat_template=False, progress=False)
    return model, stats


def neuron_set(circuit: Circuit) -> set[tuple[int, int]]:
    return set(zip(circuit.layers.tolist(), circuit.neurons.tolist()))


def measured_rate(model, tokenizer, circuit: Circuit | None, multiplier: float = 0.0) -> float:
    texts = generate(model, tokenizer, EVAL, circuits=circuit, multiplier=multiplier, max_new_tokens=4,
                     chat_template=False, progress=False)
    return behavior_rate(texts, shows_template)


# ------------------------------------------------------------------------ the planted two-template behavior


def test_planted_model_has_two_templates(planted, plain_tokenizer):
    """Independent of tune: the default top 0.1% removes template A only; B takes over on " zebra" prompts."""
    model, stats = planted
    default = attribute(stats)  # the paper's default: top 0.1% of 4 x 512 neurons = 2
    assert neuron_set(default) == set(A_NEURONS)
    assert measured_rate(model, plain_tokenizer, None) == 1.0
    ablated = generate(model, plain_tokenizer, EVAL, circuits=default, multiplier=0.0, max_new_tokens=4,
                       chat_template=False, progress=False)
    assert all(text.startswith("mais") for text in ablated[:4])  # the second template
    assert measured_rate(model, plain_tokenizer, default) == 0.5
    both = attribute(stats, top_k=4)
    assert neuron_set(both) == set(A_NEURONS) | set(B_NEURONS)
    assert measured_rate(model, plain_tokenizer, both) == 0.0


def test_tune_removes_what_the_default_misses(planted, plain_tokenizer):
    model, _stats = planted
    result = tune(model, plain_tokenizer, POSITIVE, NEGATIVE, EVAL, kl_budget=0.1, **SEARCH)
    chosen = result.chosen
    assert chosen.behavior_rate == 0.0 and chosen.kl <= 0.1
    assert set(A_NEURONS) <= neuron_set(result.circuit) and neuron_set(result.circuit) & set(B_NEURONS)
    # The choice is real: regenerating with the chosen circuit and multiplier removes the behavior.
    assert measured_rate(model, plain_tokenizer, result.circuit, result.multiplier) == 0.0
    assert result.circuit.meta["multiplier"] == result.multiplier
    # The smallest circuit that does it: every fully measured smaller one leaves the behavior.
    assert all(c.behavior_rate > 0 for c in result.candidates if c.final and c.size < chosen.size)
    paper = next(c for c in result.candidates if (c.score, c.size, c.multiplier) == ("diff", 2, 0.0))
    assert paper.final and paper.behavior_rate == 0.5
    assert result.baseline.behavior_rate == 1.0
    assert 0 < result.tokens_spent < result.full_grid_tokens


def test_tight_budget_prefers_a_smaller_circuit(planted, plain_tokenizer):
    """Removing template B costs KL on neutral text (its neurons also fire on " the"): a tight budget keeps
    only circuits without B, and the search returns the best of those."""
    model, stats = planted
    generous = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=0.1, scores=["diff"], **SEARCH)
    tight = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=0.005, scores=["diff"], **SEARCH)
    assert generous.chosen.kl > 0.005
    assert tight.chosen.size < generous.chosen.size and tight.chosen.kl <= 0.005
    assert not neuron_set(tight.circuit) & set(B_NEURONS)
    assert tight.chosen.behavior_rate == 0.5  # template A removed on the " capital" prompts
    assert all(c.stage == "pruned by KL" for c in tight.candidates if c.kl is not None and c.kl > 0.005)
    assert all(c.kl <= 0.005 for c in tight.candidates if c.final)


def test_iterative_discovery_finds_the_next_template(planted, plain_tokenizer):
    """With sizes 1 and 2 only, one discovery cannot reach B; re-discovering with A ablated finds it."""
    model, _ = planted
    once = tune(model, plain_tokenizer, POSITIVE, NEGATIVE, EVAL, sizes=[1, 2], scores=["diff"], **SEARCH)
    assert once.chosen.behavior_rate == 0.5
    twice = tune(model, plain_tokenizer, POSITIVE, NEGATIVE, EVAL, sizes=[1, 2], scores=["diff"], iterative=1,
                 **SEARCH)
    assert twice.chosen.round == 1 and twice.chosen.behavior_rate == 0.0
    members = neuron_set(twice.circuit)
    assert neuron_set(once.circuit) <= members and members & set(B_NEURONS)
    assert twice.circuit.meta["iterative"]["round"] == 1


def test_saved_statistics_give_the_same_search(planted, plain_tokenizer, tmp_path):
    model, stats = planted
    stats.save(tmp_path / "stats.safetensors")
    loaded = NeuronStats.load(tmp_path / "stats.safetensors")
    settings = dict(kl_budget=0.1, sizes=[2, 4], scores=["diff"], **SEARCH)
    direct = tune(model, plain_tokenizer, POSITIVE, NEGATIVE, EVAL, **settings)
    saved = tune(model, plain_tokenizer, eval_prompts=EVAL, stats=loaded, **settings)
    assert [row["behavior_rate"] for row in direct.table] == [row["behavior_rate"] for row in saved.table]
    assert neuron_set(direct.circuit) == neuron_set(saved.circuit)


def test_result_table_pareto_and_files(planted, plain_tokenizer, tmp_path):
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, kl_budget=0.05, scores=["diff", "t"],
                  **SEARCH)
    table = result.table
    assert table[0]["score"] == "baseline" and len(table) == len(result.candidates) + 1
    assert sum(row["chosen"] for row in table) == 1
    final = [row for row in table if row["stage"] in ("baseline", "final")]
    front = result.pareto
    for point in front:  # nothing fully measured beats a front point on both axes
        assert not any(row["kl"] <= point["kl"] and row["behavior_rate"] < point["behavior_rate"] for row in final)
    for row in final:  # and every measured point is matched or beaten by the front
        assert any(p["kl"] <= row["kl"] and p["behavior_rate"] <= row["behavior_rate"] for p in front)
    result.to_csv(tmp_path / "t.csv")
    result.to_json(tmp_path / "t.json")
    assert len((tmp_path / "t.csv").read_text().splitlines()) == len(table) + 1
    document = json.loads((tmp_path / "t.json").read_text())
    assert document["search"]["tokens_spent"] == result.tokens_spent
    assert document["chosen"]["size"] == result.chosen.size
    from cna_fast.cli.plotting import plot_tune

    plot_tune(result, tmp_path / "t.png")
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_scores_that_rank_alike_are_measured_once(planted, plain_tokenizer):
    """20 + 20 discovery prompts: Welch t and Cohen's d are proportional, so d adds no setting."""
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, sizes=[2, 8], scores=["t", "d"],
                  multipliers=[0.0], **SEARCH)
    assert [(c.score, c.size) for c in result.candidates] == [("t", 2), ("t", 8)]
    both = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, sizes=[2, 8], scores=["diff", "t"],
                multipliers=[0.0], **SEARCH)
    assert [(c.score, c.size) for c in both.candidates] == [("diff", 2), ("diff", 8), ("t", 2), ("t", 8)]


def test_induce_amplifies(planted, plain_tokenizer):
    """goal="induce" searches amplifications and maximizes the rate: on negative prompts A alone never fires."""
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, goal="induce", sizes=[2],
                  scores=["diff"], **SEARCH)
    assert {c.multiplier for c in result.candidates} == {1.5, 2.0, 3.0}
    assert result.chosen.behavior_rate == 1.0 and result.chosen.multiplier == 1.5  # ties: milder multiplier


# ------------------------------------------------------------------------------- shells as batch rows


def loud_model(vocab_size: int):
    """A tiny random Llama whose MLPs matter (down projections x30), so that steering moves the logits."""
    model = build_tiny_model("llama", vocab_size)
    with torch.no_grad():
        for block in model.model.layers:
            block.mlp.down_proj.weight.mul_(30.0)
    return model


def random_setting_circuits(model, tokenizer) -> tuple[list[Circuit], list[Candidate]]:
    stats = capture_contrast(model, tokenizer, POSITIVE, NEGATIVE, chat_template=False, progress=False)
    candidates = []
    for score in ("diff", "t"):
        for size in (8, 40, 120):
            circuit = attribute(stats, top_k=size, score=score)
            candidates += [Candidate(score, size, m, circuit) for m in (0.0, -1.0, 3.0)]
    return candidates


def test_disjoint_shells_rebuild_every_circuit(plain_tokenizer):
    model = build_tiny_model("llama", len(plain_tokenizer))
    candidates = random_setting_circuits(model, plain_tokenizer)
    circuits = [c.circuit for c in candidates] + [None]
    shells, membership = disjoint_shells(circuits)
    keys = [neuron_set(shell) for shell in shells]
    assert sum(len(k) for k in keys) == len(set().union(*keys))  # disjoint
    for row, circuit in enumerate(circuits):
        covered = set().union(*[keys[j] for j in membership[row].nonzero().flatten().tolist()])
        assert covered == (neuron_set(circuit) if circuit is not None else set())
    one_score = [c.circuit for c in candidates if c.score == "diff" and c.multiplier == 0.0]
    shells, _ = disjoint_shells(one_score)  # prefixes of one ranking: the shells are its rank bands
    assert [len(shell) for shell in shells] == [8, 32, 80]


def test_batched_generation_equals_separate_runs(plain_tokenizer):
    """One batched run of every setting gives, row for row, the greedy generations of separate runs."""
    model = loud_model(len(plain_tokenizer))
    candidates = random_setting_circuits(model, plain_tokenizer)
    candidates.append(Candidate(None, 0, 1.0, None))
    prompts = EVAL[:3]
    shells, table = candidate_rows(candidates)
    batched = generate(model, plain_tokenizer, prompts * len(candidates), circuits=shells,
                       multipliers=table.repeat_interleave(len(prompts), 0), max_new_tokens=6, chat_template=False,
                       batch_size=32, progress=False)
    separate = []
    for candidate in candidates:
        separate += generate(model, plain_tokenizer, prompts, circuits=candidate.circuit,
                             multiplier=candidate.multiplier, max_new_tokens=6, chat_template=False, progress=False)
    assert batched == separate
    assert len(set(batched)) > len(prompts) * 3  # the settings really generate different text


def test_batched_kl_equals_one_setting_at_a_time(plain_tokenizer):
    model = loud_model(len(plain_tokenizer))
    candidates = random_setting_circuits(model, plain_tokenizer)
    shells, table = candidate_rows(candidates)
    batched = batched_kl(model, plain_tokenizer, shells, table, NEUTRAL, max_logits=5 * 20 * len(plain_tokenizer))
    reference = capability_metrics(model, plain_tokenizer, NEUTRAL)["_logprobs"]
    for value, candidate in zip(batched.tolist(), candidates):
        def context(c=candidate):
            return steer(model, c.circuit, c.multiplier)

        alone = capability_metrics(model, plain_tokenizer, NEUTRAL, reference, context)["kl"]
        assert value == pytest.approx(alone, abs=1e-6)
    assert batched.min() > 1e-3 and len(set(batched.tolist())) == len(candidates)


# ---------------------------------------------------------------------------------------- the grid


def test_size_and_multiplier_grids():
    assert size_grid(46080, 46080) == [14, 23, 46, 92, 138, 230, 461, 922]
    assert size_grid(1000, 30, [0.001, 5, 50]) == [1, 5, 30]
    assert multiplier_grid("remove") == [0.0, 0.5, -0.5, -1.0]
    assert multiplier_grid("induce") == [1.5, 2.0, 3.0]
    for bad in ([0.0], [2.5], [-3]):
        with pytest.raises(CNAError):
            size_grid(100, 100, bad)
    with pytest.raises(CNAError):
        multiplier_grid("remove", [0.0, 1.0])
    with pytest.raises(CNAError):
        multiplier_grid("erase")
    assert screen_size(25, 40) == (13, 24)  # the 1.5B refusal search: half the prompts, 60% of the tokens
    assert screen_size(6, 4) == (6, 4)


def test_bad_inputs(planted, plain_tokenizer):
    model, stats = planted
    for kwargs in ({"kl_budget": 0.0}, {"kl_budget": float("nan")}, {"quality_floor": 1.5},
                   {"scores": ["z"]}, {"behavior": "no-such-behavior"}, {"iterative": 1}):
        with pytest.raises(CNAError):
            tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, **{**SEARCH, **kwargs})
    with pytest.raises(CNAError):
        tune(model, plain_tokenizer, stats=stats, eval_prompts=[], **SEARCH)
    other = NeuronStats([0, 1], 96)
    with pytest.raises(CNAError, match="do not fit"):
        tune(model, plain_tokenizer, stats=other, eval_prompts=EVAL, **SEARCH)


def test_nothing_within_budget(planted, plain_tokenizer):
    model, stats = planted
    result = tune(model, plain_tokenizer, stats=stats, eval_prompts=EVAL, sizes=[4], multipliers=[-1.0],
                  scores=["diff"], kl_budget=0.001, **SEARCH)
    assert result.chosen is None and result.circuit is None
    with pytest.raises(CNAError, match="raise the budget"):
        result.require_circuit()
    assert torch.isfinite(torch.tensor(result.baseline.behavior_rate))


# ------------------------------------------------------------------------------------------------ CLI


def run_cli(*args) -> int:
    from cna_fast.cli import main

    try:
        return main([str(arg) for arg in args])
    except SystemExit as exit_:
        return exit_.code


def test_cli_discover_saves_stats_and_tune_uses_them(model_dir, prompt_files, tmp_path, capsys):
    positive, negative = prompt_files
    stats_path, circuit_path = tmp_path / "stats.safetensors", tmp_path / "c.safetensors"
    assert run_cli("discover", "--positive", positive, "--negative", negative, "--model", model_dir, "--out",
                   circuit_path, "--save-stats", stats_path, "--quiet") == 0
    stats = NeuronStats.load(stats_path)
    assert stats.count.tolist() == [4.0, 4.0] and stats.meta["architecture"]["d_ff"] == 96
    assert neuron_set(attribute(stats)) == neuron_set(Circuit.load(circuit_path))  # the same statistics
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("the zebra runs\nzebra stripes\n")
    out, as_csv, as_json, plot = (tmp_path / name for name in ("t.safetensors", "t.csv", "t.json", "t.png"))
    assert run_cli("tune", "--model", model_dir, "--stats", stats_path, "--eval-prompts", eval_prompts,
                   "--behavior", "english", "--sizes", "2,8", "--scores", "diff", "--max-new-tokens", "4",
                   "--kl-budget", "5", "--out", out, "--csv", as_csv, "--json", as_json, "--plot", plot,
                   "--quiet") == 0
    tuned = Circuit.load(out)
    document = json.loads(as_json.read_text())
    assert tuned.meta["multiplier"] == document["chosen"]["multiplier"]
    assert len(tuned) == document["chosen"]["size"] and tuned.caa_directions is not None
    assert len(as_csv.read_text().splitlines()) == 2 + 2 * 4  # header, baseline, 2 sizes x 4 multipliers
    assert plot.read_bytes()[:4] == b"\x89PNG"
    assert "chosen:" in capsys.readouterr().out
    evaluation = tmp_path / "eval.json"  # cna eval without --multipliers: 1 and the tuned multiplier
    assert run_cli("eval", "--circuit", out, "--prompts", eval_prompts, "--model", model_dir, "--behavior",
                   "english", "--baseline", "none", "--max-new-tokens", "3", "--json", evaluation, "--quiet") == 0
    strengths = {row["strength"] for row in json.loads(evaluation.read_text())["metrics"]}
    assert strengths == {1.0, tuned.meta["multiplier"]}


def test_cli_uses_the_recorded_multiplier(model_dir, prompt_files, tmp_path, capsys):
    positive, negative = prompt_files
    circuit_path = tmp_path / "c.safetensors"
    assert run_cli("discover", "--positive", positive, "--negative", negative, "--model", model_dir, "--out",
                   circuit_path, "--top-k", "5", "--quiet") == 0
    assert run_cli("export", "--circuit", circuit_path, "--format", "lora", "--out", tmp_path / "e1",
                   "--model", model_dir) == 2  # no multiplier given and none recorded
    assert "give --multiplier" in capsys.readouterr().err
    circuit = Circuit.load(circuit_path)
    circuit.meta["multiplier"] = -0.5
    circuit.save(circuit_path)
    assert run_cli("generate", "--circuit", circuit_path, "--model", model_dir, "--prompt", "the zebra",
                   "--compare", "--max-new-tokens", "3", "--quiet") == 0
    assert "steered (x-0.5)" in capsys.readouterr().out
    assert run_cli("generate", "--circuit", circuit_path, "--model", model_dir, "--prompt", "the zebra",
                   "--compare", "--max-new-tokens", "3", "--multiplier", "2", "--quiet") == 0
    assert "steered (x2)" in capsys.readouterr().out
    assert run_cli("export", "--circuit", circuit_path, "--format", "lora", "--out", tmp_path / "e2",
                   "--model", model_dir) == 0
    assert "at multiplier -0.5" in capsys.readouterr().out


def test_cli_tune_needs_prompts_or_stats(model_dir, tmp_path, capsys):
    eval_prompts = tmp_path / "eval.txt"
    eval_prompts.write_text("the zebra runs\n")
    assert run_cli("tune", "--model", model_dir, "--eval-prompts", eval_prompts, "--out", tmp_path / "t.safetensors",
                   "--quiet") == 2
    assert "--stats" in capsys.readouterr().err
    assert not (tmp_path / "t.safetensors").exists()


# ------------------------------------------------------------------------------------ mixture of experts

OUT = 9  # a residual coordinate only the planted expert neuron writes


def plant_answer(model, tokenizer, word: str) -> tuple[int, int, int]:
    """A tiny MoE whose planted expert neuron (tests/test_moe.py) fires on " zebra" and makes `word` the answer.

    The neuron's down-projection column writes OUT, which nothing else writes and only `word`'s row of
    the LM head reads: after a prompt ending in " zebra" the next token is `word`; with the neuron
    ablated (or inverted) it is not. Returns the neuron as (layer, expert, index).
    """
    layer = plant_zebra_neuron(model, tokenizer)
    adapter = get_adapter(model)
    answer = tokenizer(f" {word}", add_special_tokens=False)["input_ids"][0]
    with torch.no_grad():
        model.get_input_embeddings().weight[:, OUT] = 0.0
        for name, parameter in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                parameter[OUT] = 0.0
        for index in adapter.routed_layers:
            experts = adapter.experts(index)
            (experts.down_proj[:, :, OUT] if experts.is_transposed else experts.down_proj[:, OUT, :]).zero_()
        experts = adapter.experts(layer)
        if experts.is_transposed:
            experts.down_proj[PLANT_EXPERT, PLANT_NEURON, OUT] = 1.0
        else:
            experts.down_proj[PLANT_EXPERT, OUT, PLANT_NEURON] = 1.0
        head = model.get_output_embeddings().weight
        head[:, OUT] = 0.0
        head[answer] = 0.0
        head[answer, OUT] = 10.0
    return layer, PLANT_EXPERT, PLANT_NEURON


def test_tune_on_a_mixture_of_experts_model_finds_the_planted_expert_neuron(plain_tokenizer):
    """The search runs on MoE statistics (routed and ordinary neurons ranked together), iterative round included,
    and chooses the planted routed neuron alone: ablating it removes the behavior it causes."""
    model = build_tiny_moe("qwen2_moe", len(plain_tokenizer))
    planted = plant_answer(model, plain_tokenizer, "france")
    eval_prompts = [f"{prefix} zebra" for prefix in ("the quick brown fox and the", "what is the", "you are a tiny",
                                                      "stripes on the savanna and the")]

    def says_france(text: str) -> bool:
        return "france" in text

    result = tune(model, plain_tokenizer, POSITIVE_ZEBRA, NEGATIVE_ZEBRA, eval_prompts, behavior=says_france,
                  neutral=NEUTRAL, sizes=[1, 4], scores=["diff"], reduction="all", chat_template=False,
                  max_new_tokens=2, iterative=1, progress=False)
    assert result.baseline.behavior_rate == 1.0
    assert result.chosen.behavior_rate == 0.0 and result.chosen.size == 1 and result.chosen.round == 0
    assert result.circuit.keys() == [planted] and result.circuit.routed.all()
    assert result.circuit.meta["moe_mode"] == "effective" and result.circuit.caa_directions is None
    assert any(candidate.round == 1 for candidate in result.candidates)  # the iterative round ran on MoE statistics
    assert measured_moe_rate(model, plain_tokenizer, eval_prompts, result, says_france) == 0.0


def measured_moe_rate(model, tokenizer, prompts, result, judge) -> float:
    texts = generate(model, tokenizer, prompts, circuits=result.circuit, multiplier=result.multiplier,
                     max_new_tokens=2, chat_template=False, progress=False)
    return behavior_rate(texts, judge)


POSITIVE_ZEBRA = ["zebra stripes on the savanna", "the zebra runs fast", "a zebra and a fox", "zebra zebra",
                  "what is a zebra", "the quick zebra"]
NEGATIVE_ZEBRA = ["the quick brown fox", "how do i bake bread", "write a python function", "explain photosynthesis",
                  "what is a dog", "the quick dog"]
