"""A tiny random Llama written as a GGUF file with the `gguf` package, the way llama.cpp's converter lays it out.

Tensor names and the q/k row permutation follow llama.cpp's convert_hf_to_gguf.py (written out here
independently of the library). Weights are stored in a mix of F32, F16, Q8_0 and Q4_1; `reference_model`
is the Hugging Face model holding exactly the values the file stores (each weight round-tripped through
its GGUF type), the independent truth a GGUF loader must reproduce.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, quants
from torch import nn

from tests.tiny import CHATML_TEMPLATE, build_tiny_model

# ffn_down of layer i is stored as DOWN_TYPES[i]: a source type the export keeps (F32, F16, Q8_0) and one it
# does not (Q4_1, rewritten as F16 by default).
DOWN_TYPES = ("F32", "F16", "Q8_0", "Q4_1")
_OTHER_TYPES = {"attn_q": "F16", "attn_k": "F16", "attn_v": "Q8_0", "attn_output": "F32", "ffn_gate": "Q8_0",
                "ffn_up": "Q4_1"}
_HF_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def _llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of each q/k head."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)


def stored(weight: np.ndarray, kind: str) -> np.ndarray:
    """`weight` as GGUFWriter takes it for type `kind`."""
    if kind == "F32":
        return weight.astype(np.float32)
    if kind == "F16":
        return weight.astype(np.float16)
    return quants.quantize(weight.astype(np.float32), GGMLQuantizationType[kind])


def round_trip(weight: np.ndarray, kind: str) -> np.ndarray:
    """The float32 values a reader gets back after `weight` is stored as `kind`."""
    if kind == "F32":
        return weight.astype(np.float32)
    return np.asarray(quants.dequantize(stored(weight, kind), GGMLQuantizationType[kind]), dtype=np.float32)


def _add_tensor(writer: GGUFWriter, name: str, weight: np.ndarray, kind: str) -> None:
    data = stored(weight, kind)
    writer.add_tensor(name, data, raw_dtype=None if kind in ("F32", "F16") else GGMLQuantizationType[kind])


def _add_tokenizer(writer: GGUFWriter, tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    special = set(tokenizer.all_special_tokens)
    writer.add_token_types([3 if token in special else 1 for token in tokens])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def write_tiny_llama_gguf(path: Path, tokenizer, seed: int = 0) -> nn.Module:
    """Write the tiny Llama of `seed` to `path` as GGUF; return the Hugging Face model of the values stored."""
    model = build_tiny_model("llama", vocab_size=len(tokenizer), seed=seed)
    config = model.config
    writer = GGUFWriter(path, "llama")
    writer.add_name("tiny llama test")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokenizer))
    _add_tokenizer(writer, tokenizer)

    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    truth = {}

    def put(gguf_name: str, hf_name: str, kind: str, permute_heads: int | None = None) -> None:
        weight = state[hf_name]
        written = _llama_cpp_permute(weight, permute_heads) if permute_heads else weight
        _add_tensor(writer, gguf_name, written, kind)
        back = round_trip(written, kind)
        truth[hf_name] = _llama_cpp_permute_back(back, permute_heads) if permute_heads else back

    put("token_embd.weight", "model.embed_tokens.weight", "Q8_0")
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        put(f"blk.{layer}.attn_norm.weight", f"{prefix}.input_layernorm.weight", "F32")
        put(f"blk.{layer}.ffn_norm.weight", f"{prefix}.post_attention_layernorm.weight", "F32")
        for gguf_part, kind in _OTHER_TYPES.items():
            heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}.get(gguf_part)
            put(f"blk.{layer}.{gguf_part}.weight", f"{prefix}.{_HF_NAMES[gguf_part]}.weight", kind, heads)
        put(f"blk.{layer}.ffn_down.weight", f"{prefix}.mlp.down_proj.weight", DOWN_TYPES[layer % len(DOWN_TYPES)])
    put("output_norm.weight", "model.norm.weight", "F32")
    put("output.weight", "lm_head.weight", "F16")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model.load_state_dict({name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in truth.items()})
    return model.eval()


def _llama_cpp_permute_back(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
        weight.shape)
