"""bitsandbytes 8-bit and 4-bit models on CPU: discovery, steering and the LoRA export.

bitsandbytes' 4-bit CPU path needs every linear's input width to be a multiple of its
quantization block (64). With more than one block per row (input width 128 or more), bitsandbytes
0.50 re-packs the weight's absmax on every forward on CPU, so repeated forwards drift; these tiny
Llamas therefore use hidden size and d_ff 64, where 4-bit forwards are deterministic.
"""
from pathlib import Path

import pytest
import torch

from cna_fast import discover, load_model
from cna_fast.export import export_lora
from cna_fast.steering import steer
from tests.test_capture import PLANT_LAYER, PLANT_NEURON, TRIGGER, _END_WORDS, plant_neuron, trigger_id
from tests.tiny import build_tiny_model

pytest.importorskip("bitsandbytes")
D_FF = 64


@pytest.fixture(scope="module")
def planted_dir(tmp_path_factory, plain_tokenizer) -> Path:
    """A tiny Llama whose layer-1 neuron 17 fires for the trigger token, saved for quantized loading."""
    model = build_tiny_model("llama", len(plain_tokenizer), intermediate_size=D_FF)
    plant_neuron(model, trigger_id(plain_tokenizer), sign=1.0)
    folder = tmp_path_factory.mktemp("planted")
    model.save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory, plain_tokenizer) -> Path:
    """A tiny random Llama with no planted neuron (ordinary activation sizes)."""
    folder = tmp_path_factory.mktemp("random")
    build_tiny_model("llama", len(plain_tokenizer), intermediate_size=D_FF, seed=3).save_pretrained(folder)
    plain_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_discovery_finds_planted_neuron(planted_dir, quantization):
    model, tokenizer = load_model(planted_dir, quantization=quantization)
    down = model.model.layers[PLANT_LAYER].mlp.down_proj
    assert type(down).__name__ == ("Linear8bitLt" if quantization == "8bit" else "Linear4bit")
    positive = [words + TRIGGER for words in _END_WORDS]
    circuit = discover(model, tokenizer, positive, list(_END_WORDS), top_k=5, chat_template=False, progress=False)
    assert (int(circuit.layers[0]), int(circuit.neurons[0])) == (PLANT_LAYER, PLANT_NEURON)
    assert float(circuit.deltas[0]) > 10 * abs(float(circuit.deltas[1]))


def load_warm_four_bit(folder: Path):
    """Load 4-bit and run one full forward: bitsandbytes repacks each 4-bit weight for its CPU kernel on the
    first forward (changing the state dict)."""
    model, tokenizer = load_model(folder, quantization="4bit")
    with torch.no_grad():
        model(**tokenizer(["warm up every layer"], return_tensors="pt"))
    return model, tokenizer


@pytest.fixture(scope="module")
def four_bit(planted_dir):
    model, tokenizer = load_warm_four_bit(planted_dir)
    positive = [words + TRIGGER for words in _END_WORDS]
    circuit = discover(model, tokenizer, positive, list(_END_WORDS), top_k=12, chat_template=False, progress=False)
    ids = tokenizer(["the quick brown fox" + TRIGGER, "what is the capital of france"], return_tensors="pt",
                    padding=True)
    return model, tokenizer, circuit, ids


def test_four_bit_steering_is_exactly_reversible(four_bit):
    model, _, circuit, ids = four_bit
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with torch.no_grad():
        before = model(**ids).logits
        with steer(model, circuit, 1.0):
            identity = model(**ids).logits
        with steer(model, circuit, 0.0):
            ablated = model(**ids).logits
        after = model(**ids).logits
    assert torch.equal(before, identity) and torch.equal(before, after)
    assert not torch.allclose(before, ablated, atol=1e-4)
    changed = [name for name, tensor in model.state_dict().items() if not torch.equal(state[name], tensor)]
    assert not changed


@pytest.mark.parametrize("multiplier", [0.0, 2.5])
def test_four_bit_lora_export_matches_hook_path(random_dir, tmp_path, multiplier):
    """B is computed from the 4-bit weight as the layer applies it; PEFT's LoRA on the 4-bit base equals the hook.

    bitsandbytes' CPU 4-bit kernel rounds its outputs to bfloat16, so the two paths (scaled input vs
    base output plus a float32 correction) agree to that precision, not bit for bit: the mismatch must
    be small next to the steering effect. (With a huge activation in the circuit, the base kernel's
    rounding of that activation's contribution is what remains; see README, Scaling up.)
    """
    from peft import PeftModel

    model, tokenizer = load_warm_four_bit(random_dir)
    circuit = discover(model, tokenizer, [w + TRIGGER for w in _END_WORDS], list(_END_WORDS), top_k=12,
                       chat_template=False, progress=False)
    ids = tokenizer(["the quick brown fox" + TRIGGER, "what is the capital of france"], return_tensors="pt",
                    padding=True)
    export_lora(model, circuit, multiplier, tmp_path / "adapter")
    with torch.no_grad():
        unsteered = model(**ids).logits
        with steer(model, circuit, multiplier):
            hooked = model(**ids).logits
    base, _ = load_warm_four_bit(random_dir)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        served = adapted(**ids).logits
    real = ids["attention_mask"].bool()  # pad positions carry no meaning
    effect = (hooked - unsteered)[real].abs().max()
    assert (served - hooked)[real].abs().max() < 0.1 * effect  # an adapter doing nothing would miss by 1.0 x effect
