"""Export: a circuit at a fixed multiplier as a change of the weights, for serving without this library.

hf: a folded Hugging Face checkpoint, or a PEFT LoRA adapter on the down projections (vLLM per
request); gguf: the source GGUF with the circuit folded in (llama.cpp, Ollama); gguf_lora: llama.cpp's
GGUF LoRA, one adapter whose per-request scale s steers at 1 + s(m - 1); serving: the
checks vLLM's adapter loader makes, and how to serve each export.
"""
from .gguf import GGUF_TYPES, check_gguf_output, export_gguf, gguf_serving_instructions
from .gguf_lora import (check_gguf_lora_output, effective_multiplier, export_gguf_lora, gguf_lora_instructions,
                        lora_scale_for, read_provenance)
from .hf import dense_weight, export_folded, export_lora, weight_columns
from .serving import check_vllm_adapter, lora_serving_note, serve_rank, vllm_serving_instructions

__all__ = ["GGUF_TYPES", "check_gguf_lora_output", "check_gguf_output", "check_vllm_adapter", "dense_weight",
           "effective_multiplier", "export_folded", "export_gguf", "export_gguf_lora", "export_lora",
           "gguf_lora_instructions", "gguf_serving_instructions", "lora_scale_for", "lora_serving_note",
           "read_provenance", "serve_rank", "vllm_serving_instructions", "weight_columns"]
