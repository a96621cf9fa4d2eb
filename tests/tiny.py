"""Tiny random-weight models and a trained BPE tokenizer for offline unit tests."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is the capital of france and why is it famous",
    "how do i bake bread at home with flour water and salt",
    "quelle est la capitale de la france et pourquoi",
    "comment faire du pain à la maison avec de la farine",
    "zebra zebra zebra stripes on the savanna",
    "write a python function that sorts a list of numbers",
    "explain photosynthesis to a child in simple words",
    "the history of rome began with a small village",
    "you are a tiny test assistant system user",
] * 20

# Small configs per architecture: 4 layers, hidden 64, d_ff 96, vocabulary set by the caller.
_COMMON = dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
ARCH_CONFIGS: dict[str, dict] = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "qwen3": dict(_COMMON, head_dim=16),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma2": dict(_COMMON, head_dim=16, sliding_window=32),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=32),
    "olmo2": dict(_COMMON),
    "phi3": dict(_COMMON),
    "phi": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                max_position_embeddings=256),
    "gpt2": dict(n_layer=4, n_embd=64, n_inner=96, n_head=4, n_positions=256),
    "gpt_neox": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                     max_position_embeddings=256),
}


# Decoder blocks and the down projection inside a block, written out independently of the library.
DOWN_PATHS = {
    **{mt: ("model.layers", "mlp.down_proj") for mt in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                                         "gemma3_text", "olmo2", "phi3")},
    "phi": ("model.layers", "mlp.fc2"),
    "gpt2": ("transformer.h", "mlp.c_proj"),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h"),
}


def build_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on a small corpus; ChatML special tokens; pad = <|im_end|>."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                        eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>")
    if chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32,
                     **overrides):
    """A random-weight causal LM of `model_type`, small enough for CPU unit tests; `overrides` edit the config."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=2,
                                  **{**ARCH_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)  # sdpa where the architecture has it
    return model.eval()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the model's state dict."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def assert_state_identical(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    """Same keys, dtypes, shapes and bytes as the snapshot."""
    after = model.state_dict()
    assert after.keys() == before.keys()
    for name, tensor in after.items():
        assert tensor.dtype == before[name].dtype, name
        assert tensor.shape == before[name].shape, name
        assert torch.equal(tensor.contiguous().view(torch.uint8), before[name].contiguous().view(torch.uint8)), name


def assert_close_in_ulps(actual: torch.Tensor, expected: torch.Tensor, ulps: int = 4) -> None:
    """Equal up to `ulps` units in the last place of the largest |expected|: the rounding of the BLAS build
    (its summation order changes the last bits from one torch build to the next), and nothing more."""
    atol = ulps * torch.finfo(expected.dtype).eps * expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=0, atol=atol)
