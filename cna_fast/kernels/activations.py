"""MLP activations: the torch function, the Triton device helpers, and config names -> kinds.

Four kinds cover the supported architectures: "silu" (Llama, Qwen, Mistral, Phi-3), "gelu" (erf;
GPT-NeoX), "gelu_tanh" (the tanh approximation: GPT-2's gelu_new, Gemma's gelu_pytorch_tanh) and
"relu". Inside kernels every activation is computed in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import jit, tl

ACTIVATION_KINDS = ("silu", "gelu", "gelu_tanh", "relu")

# transformers' ACT2FN names -> kinds. gelu_new, gelu_fast, gelu_accurate and gelu_pytorch_tanh are
# all 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), up to rounding.
_CONFIG_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_accurate": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "relu": "relu",
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def activation_kind(name: str) -> str:
    """The kind ("silu", "gelu", "gelu_tanh", "relu") for a transformers activation name or a kind."""
    kind = _CONFIG_NAMES.get(str(name).lower())
    if kind is None:
        raise ValueError(f"activation {name!r} is not supported by the fused kernels; supported: "
                         f"{', '.join(sorted(_CONFIG_NAMES))}")
    return kind


def apply_activation(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`kind`'s activation of `x` in torch, in `x`'s dtype."""
    kind = activation_kind(kind)
    if kind == "silu":
        return F.silu(x)
    if kind == "gelu":
        return F.gelu(x)
    if kind == "gelu_tanh":
        return F.gelu(x, approximate="tanh")
    return F.relu(x)


def check_gate_up(gate: torch.Tensor, up: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate the [rows, d_ff] inputs of the fused kernels; rows may be strided, columns must not be."""
    if gate.dim() != 2:
        raise ValueError(f"gate must be [rows, d_ff], got shape {list(gate.shape)}")
    if gate.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"gate must be float32, float16 or bfloat16, got {gate.dtype}")
    if up is not None and (up.shape != gate.shape or up.dtype != gate.dtype or up.device != gate.device):
        raise ValueError(f"up must match gate: got {list(up.shape)} {up.dtype} on {up.device}, gate is "
                         f"{list(gate.shape)} {gate.dtype} on {gate.device}")
    if gate.stride(-1) != 1:
        gate = gate.contiguous()
    if up is not None and up.stride(-1) != 1:
        up = up.contiguous()
    return gate, up


def act_and_mul_torch(gate: torch.Tensor, up: torch.Tensor | None, kind: str) -> torch.Tensor:
    """act(gate) * up in float32 (plain MLPs: act(gate)); callers round once to the input dtype, like the kernels."""
    h = apply_activation(gate.float(), kind)
    return h if up is None else h * up.float()


@jit
def sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@jit
def silu(x):
    return x * sigmoid(x)


@jit
def gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@jit
def gelu_tanh(x):
    # 0.5 (1 + tanh(z)) == sigmoid(2 z): no tanh needed, and no cancellation for negative z.
    return x * sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@jit
def relu(x):
    return tl.maximum(x, 0.0)


@jit
def activate(x, KIND: tl.constexpr):
    """`KIND`'s activation of a float32 tile."""
    if KIND == "silu":
        y = silu(x)
    elif KIND == "gelu":
        y = gelu(x)
    elif KIND == "gelu_tanh":
        y = gelu_tanh(x)
    else:
        y = relu(x)
    return y


@jit
def load_activated(gate_ptr, up_ptr, offsets, cols, gate_stride, up_stride, mask, KIND: tl.constexpr,
                   HAS_UP: tl.constexpr):
    """act(gate) * up (plain MLPs: act(gate)) of one [rows, cols] tile in float32; `offsets`: the rows, int64 [R, 1]."""
    values = activate(tl.load(gate_ptr + offsets * gate_stride + cols[None, :], mask=mask, other=0.0)
                      .to(tl.float32), KIND)
    if HAS_UP:
        values = values * tl.load(up_ptr + offsets * up_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    return values
