"""A tiny Llama with a planted two-template behavior, for testing the circuit search.

Attention is switched off (every o_proj is zero), so each position's next token depends on its own
token only, through MLP neurons written by hand into a residual stream with named directions:

- a "request" token (" zebra" or " capital") sets direction REQUEST; " zebra" also sets ZEBRA;
- template A: neurons A (layers 1 and 3) fire on REQUEST and write A_OUT, which makes the next
  token " france";
- template B: neurons B (layers 2 and 3) fire on ZEBRA and write B_OUT, which makes the next
  token " mais" when A is silent; they also fire on " the" and there write KL_OUT (a push towards
  " hist"), so removing them costs KL on neutral text;
- with neither, the request's own direction makes the next token " list" (no behavior).

Every other token carries OTHER, which the three answer tokens' LM-head rows strongly penalize, so
the answer tokens never appear after anything but a request. Discovery on request-vs-other prompts
ranks A first (it fires on every request), then B (half of them), then the random neurons, which
are tiny. So ablating the top 2 (the default 0.1% of 4 x 512 neurons) removes template A, and
" zebra" prompts switch to template B; ablating the top 4 removes both.
"""
from __future__ import annotations

import re

import torch

from tests.tiny import build_tiny_model

REQUEST, A_OUT, B_OUT, OTHER, THE, ZEBRA, KL_OUT = range(7)
A_NEURONS = [(1, 10), (3, 20)]
B_NEURONS = [(2, 30), (3, 40)]
D_FF = 512
TOKENS = {"zebra": 306, "capital": 317, "the": 289, "france": 316, "mais": 399, "list": 398, "hist": 396}
TEMPLATES = re.compile(r"france|mais")

PREFIXES = ["the quick brown fox and the", "how do i bake bread with a", "write a python function for the",
            "explain photosynthesis to the", "the history of rome and a", "what is the", "you are a tiny",
            "comment faire du pain avec le", "quelle est la", "stripes on the savanna and the"]
POSITIVE = [f"{prefix} zebra" for prefix in PREFIXES] + [f"{prefix} capital" for prefix in PREFIXES]
NEGATIVE = [f"{prefix} {word}" for prefix in PREFIXES for word in ("dog", "bread")]
EVAL = [f"{prefix} zebra" for prefix in PREFIXES[:4]] + [f"{prefix} capital" for prefix in PREFIXES[4:8]]
NEUTRAL = ["the quick brown fox jumps over the lazy dog and the cat", "the history of rome began with the village",
           "how do i bake the bread at the home with the salt", "explain the photosynthesis to the child"]


def shows_template(text: str) -> bool:
    """The planted behavior: either template's word in the answer."""
    return TEMPLATES.search(text) is not None


def _set_neuron(model, layer: int, neuron: int, reads: dict[int, float], writes: dict[int, float]) -> None:
    mlp = model.model.layers[layer].mlp
    for weight in (mlp.gate_proj.weight, mlp.up_proj.weight):
        weight[neuron] = 0.0
        for direction, value in reads.items():
            weight[neuron, direction] = value
    mlp.down_proj.weight[:, neuron] = 0.0
    for direction, value in writes.items():
        mlp.down_proj.weight[direction, neuron] = value


def build_planted_model(vocab_size: int, seed: int = 0):
    """The tiny Llama described in the module docstring (float32, eval mode)."""
    model = build_tiny_model("llama", vocab_size, seed=seed, intermediate_size=D_FF)
    named = range(KL_OUT + 1)
    with torch.no_grad():
        for block in model.model.layers:
            block.self_attn.o_proj.weight.zero_()
            for weight in (block.mlp.gate_proj.weight, block.mlp.up_proj.weight):
                weight[:, list(named)] = 0.0  # random neurons never read the named directions
            block.mlp.down_proj.weight[list(named)] = 0.0  # ... nor write them
        embed = model.model.embed_tokens.weight
        embed[:, list(named)] = 0.0
        embed[:, OTHER] = 1.0
        for word, flags in (("zebra", (REQUEST, ZEBRA)), ("capital", (REQUEST,)), ("the", (OTHER, THE))):
            embed[TOKENS[word], OTHER] = 0.0
            for flag in flags:
                embed[TOKENS[word], flag] = 1.0
        for layer, neuron in A_NEURONS:
            _set_neuron(model, layer, neuron, {REQUEST: 0.5}, {A_OUT: 0.02})
        for layer, neuron in B_NEURONS:
            _set_neuron(model, layer, neuron, {ZEBRA: 0.4, THE: 0.4}, {B_OUT: 0.05, KL_OUT: 0.05})
        head = model.lm_head.weight
        head[:, list(named)] = 0.0
        for word, direction, weight in (("france", A_OUT, 20.0), ("mais", B_OUT, 10.0), ("list", REQUEST, 3.5),
                                        ("hist", KL_OUT, 1.7)):
            head[TOKENS[word]] = 0.0
            head[TOKENS[word], direction] = weight
            if word != "hist":  # the answers never follow an ordinary token
                head[TOKENS[word], OTHER] = -30.0
    return model
