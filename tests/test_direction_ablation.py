"""Directional ablation, the refusal-direction baseline: the residual direction against an independent float64
computation, the projection hooks against hand-orthogonalised weights, exact removal, per-row strengths, its rows in
compare_methods and `cna eval --baseline ablation`."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cna_fast.capture import ResidualDirections, residual_directions
from cna_fast.errors import CNAError
from cna_fast.evaluation import compare_methods
from cna_fast.steering import AblateDirection, ablation_changed_parameters, circuit_changed_parameters, generate
from tests.test_cli import run_cli
from tests.test_steering import hook_count, make_circuit, sharp_model
from tests.tiny import assert_state_identical, build_tiny_model, snapshot
from tests.tiny_moe import build_tiny_moe

# Prompts of clearly different lengths, so that every batch of 3 is padded.
HARMFUL = ["zebra", "the zebra runs fast across the savanna at night", "a zebra and a fox",
           "zebra stripes on the savanna and the zebra runs", "zebra zebra"]
HARMLESS = ["how do i bake bread at home with flour water and salt", "the quick brown fox", "explain photosynthesis",
            "write a python function that sorts a list of numbers"]
BLOCKS = {"gpt2": "transformer.h", "gpt_neox": "gpt_neox.layers"}  # else model.layers


def blocks_of(model: nn.Module) -> nn.ModuleList:
    return model.get_submodule(BLOCKS.get(model.config.model_type, "model.layers"))


def random_unit(width: int, seed: int = 0) -> torch.Tensor:
    direction = torch.randn(width, generator=torch.Generator().manual_seed(seed))
    return direction / direction.norm()


@torch.no_grad()
def residual_states(model: nn.Module, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """transformers' hidden states, the last one replaced by the last block's raw output (transformers' last one
    has the final norm applied)."""
    kept = {}
    handle = blocks_of(model)[-1].register_forward_hook(lambda module, args, output: kept.setdefault("out", output))
    try:
        hidden = model(input_ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    last = kept["out"][0] if isinstance(kept["out"], tuple) else kept["out"]
    return [*hidden[:-1], last]


def independent_direction(model: nn.Module, tokenizer, positive: list[str], negative: list[str]):
    """Per-prompt, unpadded forwards through the chat template; float64 means and pooled Cohen's d."""
    def last_tokens(prompts):
        rows = []
        for prompt in prompts:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                 add_generation_prompt=True)
            ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
            rows.append(torch.stack([state[0, -1].double() for state in residual_states(model, ids)]))
        return torch.stack(rows)  # [n, layers + 1, hidden]

    pos, neg = last_tokens(positive), last_tokens(negative)
    differences = pos.mean(0) - neg.mean(0)
    units = differences / differences.norm(dim=-1, keepdim=True)
    along_pos, along_neg = (pos * units).sum(-1), (neg * units).sum(-1)
    pooled = (((len(pos) - 1) * along_pos.var(0) + (len(neg) - 1) * along_neg.var(0))
              / (len(pos) + len(neg) - 2)).sqrt()
    return differences, (along_pos.mean(0) - along_neg.mean(0)) / pooled


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_direction_equals_an_independent_float64_computation(tokenizer, padding_side):
    model = sharp_model("llama", len(tokenizer))  # states far apart, so that a pad token read would show
    found = residual_directions(model, tokenizer, HARMFUL, HARMLESS, batch_size=3, padding_side=padding_side,
                                progress=False)
    differences, cohens_d = independent_direction(model, tokenizer, HARMFUL, HARMLESS)
    assert found.differences.dtype == torch.float64 and found.differences.shape == (5, 64)
    torch.testing.assert_close(found.differences, differences, rtol=0, atol=1e-5)
    torch.testing.assert_close(found.cohens_d[1:], cohens_d[1:], rtol=1e-4, atol=1e-4)
    assert found.differences[1:].abs().amax(-1).min() > 1.0  # far above the tolerance
    assert found.differences[0].abs().max() == 0  # the chat template ends every prompt with the same token
    assert found.meta["n_positive"] == 5 and found.meta["chat_template"] is True


def test_default_layer_is_the_best_separated_middle_layer():
    differences = torch.randn(11, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    cohens_d = torch.tensor([9.0, 0, 1, 5, 2, 3, 0, 1, 4, 0, 8], dtype=torch.float64)
    directions = ResidualDirections(differences, cohens_d)
    assert directions.middle_layers() == [2, 3, 4, 5, 6, 7, 8]  # 20%..80% of 10 layers: 0, 1, 9, 10 left out
    assert directions.best_layer() == 3 and directions.best_layer((0.0, 1.0)) == 0
    torch.testing.assert_close(directions.direction(), (differences[3] / differences[3].norm()).float())
    torch.testing.assert_close(directions.direction(10), (differences[10] / differences[10].norm()).float())
    with pytest.raises(CNAError, match="direction layer 11 is out of range"):
        directions.direction(11)
    with pytest.raises(CNAError, match="zero or not finite"):
        ResidualDirections(torch.zeros(3, 4), torch.zeros(3)).direction(1)


def test_direction_needs_two_prompts_per_side(tiny_llama, tokenizer):
    with pytest.raises(CNAError, match="negative prompt set has 1 prompt.*at least 2"):
        residual_directions(tiny_llama, tokenizer, HARMFUL, ["one"], progress=False)


# The usual pre-norm blocks, GPT-2 (position embeddings added before the first block, attention returns a tuple),
# parallel attention and MLP (Phi, GPT-NeoX), post-norms after each write (Gemma 2), a mixture of experts.
@pytest.mark.parametrize("family", ["llama", "gpt2", "phi", "gpt_neox", "gemma2", "qwen2_moe"])
def test_ablation_leaves_no_component_and_strength_one_is_the_identity(tokenizer, family):
    model = (build_tiny_moe(family, len(tokenizer)) if family == "qwen2_moe"
             else build_tiny_model(family, len(tokenizer)))
    ids = torch.randint(3, len(tokenizer), (2, 9), generator=torch.Generator().manual_seed(0))
    direction = random_unit(64)
    before = residual_states(model, ids)
    assert min((state @ direction).abs().max() for state in before) > 1e-3  # there is a component to remove
    with AblateDirection(model, direction * 3.0, 0.0):  # any length: normalized
        after = residual_states(model, ids)
    assert len(after) == 5
    for state in after:
        assert (state @ direction).abs().max() < 1e-5 * state.abs().max()
    with torch.no_grad():
        unsteered = model(ids).logits
        with AblateDirection(model, direction, 1.0):
            identity = model(ids).logits
        with AblateDirection(model, direction, torch.tensor([1.0, 0.0])):
            mixed = model(ids).logits
    assert torch.equal(identity, unsteered)
    # a row at strength 1 beside an ablated row: unchanged (up to the experts' grouping of the batch's tokens)
    torch.testing.assert_close(mixed[0], unsteered[0], rtol=0, atol=1e-5)
    assert not torch.allclose(mixed[1], unsteered[1], atol=1e-3)


def orthogonalised(model: nn.Module, direction: torch.Tensor, strength: float) -> nn.Module:
    """A copy of a Llama whose embedding, attention output and down projections are edited by hand in float64:
    W <- W - (1 - strength) r r^T W (embedding rows: e <- e - (1 - strength)(e . r) r)."""
    clone = copy.deepcopy(model)
    r = direction.double()
    with torch.no_grad():
        weights = [clone.model.embed_tokens.weight]
        for block in clone.model.layers:
            weights += [block.self_attn.o_proj.weight, block.mlp.down_proj.weight]
        for index, weight in enumerate(weights):
            w = weight.double()
            if index == 0:  # [vocab, hidden]: one residual vector per row
                edited = w - (1 - strength) * torch.outer(w @ r, r)
            else:  # [hidden, in]: one residual vector per column
                edited = w - (1 - strength) * torch.outer(r, r @ w)
            weight.copy_(edited.float())
    return clone


@pytest.mark.parametrize("strength", [0.0, 0.5, -1.0])
def test_hooks_equal_the_weight_orthogonalised_model(tokenizer, strength):
    model = build_tiny_model("llama", len(tokenizer))
    assert not model.config.tie_word_embeddings  # the edit of the embedding must not reach the LM head
    direction = random_unit(64, seed=3)
    folded = orthogonalised(model, direction, strength)
    ids = torch.randint(3, len(tokenizer), (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = folded(ids).logits
        with AblateDirection(model, direction, strength):
            steered = model(ids).logits
        unsteered = model(ids).logits
    torch.testing.assert_close(steered, expected, rtol=1e-4, atol=1e-4)
    assert (steered - unsteered).abs().max() > 1e-2  # the edit matters, so a no-op would fail


def test_changed_parameters_counts_every_edited_weight(tokenizer):
    model = build_tiny_model("llama", len(tokenizer))
    folded = orthogonalised(model, random_unit(64, seed=4), 0.0)
    changed = sum(int((folded.state_dict()[name] != tensor).sum()) for name, tensor in model.state_dict().items())
    config = model.config
    expected = config.vocab_size * 64 + config.num_hidden_layers * (64 * 64 + 64 * config.intermediate_size)
    padding_row = model.model.embed_tokens.weight[config.pad_token_id]
    assert not padding_row.any()  # the pad token's embedding is zero, so the edit leaves it as it is
    assert ablation_changed_parameters(model) == expected == changed + 64
    assert circuit_changed_parameters(model, make_circuit(model, [0, 1, 3], [5, 7, 9])) == 3 * 64
    gpt2 = build_tiny_model("gpt2", len(tokenizer))  # position embeddings and biases count too
    per_layer = (64 * 64 + 64) + (96 * 64 + 64)
    assert ablation_changed_parameters(gpt2) == (len(tokenizer) + 256) * 64 + 4 * per_layer


def test_the_model_is_bit_identical_after_the_context(tiny_llama):
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    state = snapshot(tiny_llama)
    with torch.no_grad():
        before = tiny_llama(ids).logits
        with pytest.raises(RuntimeError, match="inside"):
            with AblateDirection(tiny_llama, random_unit(64), 0.0):
                assert not torch.equal(tiny_llama(ids).logits, before)
                raise RuntimeError("inside")
        after = tiny_llama(ids).logits
    assert hook_count(tiny_llama) == 0 and torch.equal(after, before)
    assert_state_identical(tiny_llama, state)
    with pytest.raises(CNAError, match="residual stream is 64 wide"):
        AblateDirection(tiny_llama, torch.ones(65))
    with pytest.raises(CNAError, match="zero or not finite"):
        AblateDirection(tiny_llama, torch.zeros(64))
    with pytest.raises(CNAError, match="finite number"):
        AblateDirection(tiny_llama, random_unit(64), float("nan"))
    assert hook_count(tiny_llama) == 0


def test_per_row_strengths_equal_separate_runs(tiny_llama):
    ids = torch.randint(3, 400, (4, 8), generator=torch.Generator().manual_seed(2))
    strengths = [0.0, 1.0, -0.5, 2.0]
    direction = random_unit(64, seed=5)
    with torch.no_grad():
        with AblateDirection(tiny_llama, direction, torch.tensor(strengths)):
            together = tiny_llama(ids).logits
        for row, strength in enumerate(strengths):
            with AblateDirection(tiny_llama, direction, strength):
                alone = tiny_llama(ids[row:row + 1]).logits[0]
            torch.testing.assert_close(together[row], alone, rtol=0, atol=1e-5)
        with pytest.raises(CNAError, match="2 rows but the batch has 4"):
            with AblateDirection(tiny_llama, direction, torch.tensor([0.0, 1.0])):
                tiny_llama(ids)


def test_compare_methods_runs_ablation_in_the_batch_and_the_capability_pass(tokenizer):
    model = sharp_model("llama", len(tokenizer))
    circuit = make_circuit(model, [0, 1, 3], [5, 7, 9])
    directions = residual_directions(model, tokenizer, HARMFUL, HARMLESS, progress=False)
    prompts = ["zebra", "bread and salt", "the quick brown fox jumps"]
    questions = [{"question": f"question {i}", "choices": ["a", "b", "c", "d"], "answer": i % 4} for i in range(3)]
    result = compare_methods(model, tokenizer, circuit, prompts, [0.0, 1.0, -1.0], methods=["cna", "ablation"],
                             behavior="english", direction=directions, neutral=["the quick brown fox jumps"],
                             questions=questions, max_new_tokens=4, progress=False)
    rows = {(row["method"], row["strength"]): row for row in result.metrics}
    assert set(rows) == {(method, value) for method in ("cna", "ablation") for value in (0.0, 1.0, -1.0)}
    assert rows[("ablation", 1.0)]["kl"] == 0.0 and rows[("ablation", 0.0)]["kl"] > 0
    for strength in (0.0, -1.0):  # the batched rows equal a separate run under the same ablation
        with AblateDirection(model, directions.direction(), strength):
            alone = generate(model, tokenizer, prompts, max_new_tokens=4, progress=False)
        batched = [item["output"] for item in result.generations
                   if item["method"] == "ablation" and item["strength"] == strength]
        assert batched == alone
    unsteered = generate(model, tokenizer, prompts, max_new_tokens=4, progress=False)
    assert batched != unsteered  # ablation changed the answers, so a dropped hook would fail
    assert "ablation" in result.table() and result.to_csv().count("\nablation,") == 3


def test_compare_methods_ablation_needs_a_direction(tiny_llama, tokenizer):
    circuit = make_circuit(tiny_llama, [0], [5])
    with pytest.raises(CNAError, match="ablation baseline needs a residual direction"):
        compare_methods(tiny_llama, tokenizer, circuit, ["a"], methods=["cna", "ablation"], progress=False)




def test_cli_ablation_without_prompt_sets_is_a_clear_error(model_dir, circuit_path, prompt_files, capsys):
    base = ["eval", "--circuit", circuit_path, "--prompts", prompt_files[0], "--model", model_dir, "--quiet"]
    assert run_cli(*base, "--baseline", "caa,ablation", "--positive", prompt_files[0]) == 2
    assert "--baseline ablation needs the two prompt sets" in capsys.readouterr().err
    assert run_cli(*base, "--baseline", "caa", "--positive", prompt_files[0], "--negative", prompt_files[1]) == 2
    assert "add ablation to --baseline" in capsys.readouterr().err


def test_cli_eval_with_the_ablation_baseline(model_dir, circuit_path, prompt_files, tokenizer, tmp_path, capsys):
    outputs = {kind: tmp_path / f"eval.{kind}" for kind in ("csv", "json", "png", "html")}
    code = run_cli("eval", "--circuit", circuit_path, "--prompts", prompt_files[0], "--model", model_dir,
                   "--baseline", "random,ablation", "--positive", prompt_files[0], "--negative", prompt_files[1],
                   "--direction-layer", "2", "--multipliers", "0,1", "--max-new-tokens", "3", "--no-capability",
                   "--quiet", "--csv", outputs["csv"], "--json", outputs["json"], "--plot", outputs["png"],
                   "--html", outputs["html"])
    assert code == 0
    out = capsys.readouterr().out
    assert "ablation direction: residual layer 2 of 0..4 (given" in out and "\nablation " in out
    report = json.loads(outputs["json"].read_text())
    assert {(row["method"], row["strength"]) for row in report["metrics"] if row["method"] == "ablation"} == \
        {("ablation", 0.0), ("ablation", 1.0)}
    assert report["changed_parameters"] == {"cna": 6 * 64, "ablation": len(tokenizer) * 64 + 4 * (64 * 64 + 64 * 96)}
    assert outputs["csv"].read_text().count("\nablation,") == 2
    assert outputs["png"].read_bytes()[:4] == b"\x89PNG" and "ablation" in outputs["html"].read_text()
