"""Tiny random-weight mixture-of-experts models of six families, for offline unit tests.

Each config has 4 layers, 8 experts of width 16, top-2 routing (GPT-OSS: top-2 of 8 as well), and
where the family has them a shared expert and a dense first layer, so every kind of neuron
(dense, shared, routed) is present somewhere.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_ATTENTION = dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256)
EXPERTS, EXPERT_WIDTH, TOP_K = 8, 16, 2

MOE_CONFIGS: dict[str, dict] = {
    "mixtral": dict(_ATTENTION, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                    num_experts_per_tok=TOP_K, sliding_window=None),
    "qwen2_moe": dict(_ATTENTION, intermediate_size=48, moe_intermediate_size=EXPERT_WIDTH,
                      shared_expert_intermediate_size=24, num_experts=EXPERTS, num_experts_per_tok=TOP_K,
                      decoder_sparse_step=1, mlp_only_layers=[0], norm_topk_prob=False),
    "qwen3_moe": dict(_ATTENTION, head_dim=16, intermediate_size=48, moe_intermediate_size=EXPERT_WIDTH,
                      num_experts=EXPERTS, num_experts_per_tok=TOP_K, decoder_sparse_step=1, mlp_only_layers=[],
                      norm_topk_prob=True),
    "olmoe": dict(_ATTENTION, intermediate_size=EXPERT_WIDTH, num_experts=EXPERTS, num_experts_per_tok=TOP_K),
    "gpt_oss": dict(_ATTENTION, head_dim=16, intermediate_size=EXPERT_WIDTH, num_local_experts=EXPERTS,
                    num_experts_per_tok=TOP_K, sliding_window=32),
    "deepseek_v3": dict(_ATTENTION, intermediate_size=48, moe_intermediate_size=EXPERT_WIDTH, n_routed_experts=EXPERTS,
                        n_shared_experts=1, num_experts_per_tok=TOP_K, n_group=4, topk_group=2,
                        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.5, norm_topk_prob=True,
                        num_key_value_heads=4, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
MOE_FAMILIES = tuple(MOE_CONFIGS)


def build_tiny_moe(model_type: str, vocab_size: int, seed: int = 0, experts_implementation: str = "eager",
                   dtype: torch.dtype = torch.float32, **overrides):
    """A random-weight MoE causal LM of `model_type` with the given experts implementation.

    Weights are re-drawn with a fixed seed (normal, std 0.2; router biases included) so routing
    is varied and activations are far from zero whatever the family's own initialization does.
    """
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, bos_token_id=0, eos_token_id=2, pad_token_id=2,
                                  **{**MOE_CONFIGS[model_type], **overrides})
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, experts_implementation=experts_implementation)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                continue
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.05)
    return model.eval()
