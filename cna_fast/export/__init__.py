"""Export: a circuit at a fixed multiplier as a change of the weights, for serving without this library.

hf: a folded Hugging Face checkpoint, or a PEFT LoRA adapter on the down projections (vLLM per
request); gguf: the source GGUF with the circuit folded in (llama.cpp, Ollama); serving: the
checks vLLM's adapter loader makes, and how to serve each export.
"""
from .gguf import GGUF_TYPES, check_gguf_output, export_gguf, gguf_serving_instructions
from .hf import dense_weight, export_folded, export_lora, weight_columns
from .serving import check_vllm_adapter, lora_serving_note, serve_rank, vllm_serving_instructions

__all__ = ["GGUF_TYPES", "check_gguf_output", "check_vllm_adapter", "dense_weight", "export_folded", "export_gguf",
           "export_lora", "gguf_serving_instructions", "lora_serving_note", "serve_rank", "vllm_serving_instructions",
           "weight_columns"]
