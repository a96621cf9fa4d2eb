"""Will vLLM load this LoRA adapter? The checks vLLM's loader makes, reproduced without vLLM.

vLLM is not installed here (it needs a GPU build), so its adapter checks are restated from its
source (vllm/lora: peft_helper.py `PEFTHelper`, lora_model.py `LoRAModel.from_local_checkpoint`,
utils.py `parse_fine_tuned_lora_name`, config/lora.py `MaxLoRARanks`), read, not copied:

- adapter_config.json holds `r`, `lora_alpha` and `target_modules`; r is a positive integer;
- `modules_to_save` is empty, `use_dora` is false, `bias` is "none", `trainable_token_indices` unset;
- r (and every `rank_pattern` value) is at most the server's --max-lora-rank, which must be one of
  1, 8, 16, 32, 64, 128, 256, 320, 512: a rank above 512 cannot be served at all;
- the weights are adapter_model.safetensors (or .bin/.pt); every key parses as
  `[base_model.model.]<module>.lora_A.weight` / `.lora_B.weight` (no adapter-name segment such as
  `.default.`, no bias keys), and the module's last name is one the model's LoRA layers expect;
- each module has both A [r_m, in] and B [out, r_m] with r_m <= r (vLLM copies them into buffers
  of width max_lora_rank), in a floating dtype vLLM casts to its LoRA dtype;
- the architecture implements LoRA in vLLM (GPT-2 and GPT-NeoX do not).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .._io import read_json
from ..errors import CNAError
from ..models import model_name

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_MAX_RANK = VLLM_MAX_LORA_RANKS[-1]
# Hugging Face architectures whose vLLM implementation supports LoRA, with the down projection's name there.
VLLM_LORA_DOWN_MODULES = {
    "LlamaForCausalLM": "down_proj", "MistralForCausalLM": "down_proj", "Qwen2ForCausalLM": "down_proj",
    "Qwen3ForCausalLM": "down_proj", "GemmaForCausalLM": "down_proj", "Gemma2ForCausalLM": "down_proj",
    "Gemma3ForCausalLM": "down_proj", "Olmo2ForCausalLM": "down_proj", "Phi3ForCausalLM": "down_proj",
    "PhiForCausalLM": "fc2",
}
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass
class VLLMAdapterCheck:
    """What vLLM's loader would say about an adapter folder: problems (empty when it loads) and the serve rank."""

    rank: int = 0
    modules: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def max_lora_rank(self) -> int | None:
        """The smallest --max-lora-rank vLLM accepts that holds this adapter (None above 512)."""
        return serve_rank(self.rank)


def serve_rank(rank: int) -> int | None:
    """The smallest value of vLLM's --max-lora-rank that holds rank `rank`, None above vLLM's maximum."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)


def _module_of(key: str) -> tuple[str, str] | None:
    """(module, "A" or "B") as vLLM's parse_fine_tuned_lora_name reads a weight name, None if it rejects it."""
    name = key.removeprefix("base_model.model.")
    parts = name.split(".")
    if len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in ("lora_A", "lora_B"):
        return ".".join(parts[:-2]), parts[-2][-1]
    return None


def _config_problems(config: dict) -> list[str]:
    problems = [f"adapter_config.json lacks {key!r}" for key in ("r", "lora_alpha", "target_modules")
                if key not in config]
    rank = config.get("r")
    pattern = config.get("rank_pattern") or {}
    if not isinstance(pattern, dict):
        problems.append(f"rank_pattern must be an object {{module: rank}}, got {type(pattern).__name__}")
        pattern = {}
    bad = [value for value in pattern.values() if not _positive_integer(value)]
    if bad:
        problems.append(f"rank_pattern ranks must be positive integers, got {bad[0]!r}")
    if not _positive_integer(rank):
        problems.append(f"r must be a positive integer, got {rank!r}")
    else:
        ranks = [rank, *(value for value in pattern.values() if _positive_integer(value))]
        if max(ranks) > VLLM_MAX_RANK:
            problems.append(f"rank {max(ranks)} is above vLLM's largest --max-lora-rank ({VLLM_MAX_RANK})")
    if config.get("modules_to_save"):
        problems.append("vLLM only supports modules_to_save being None")
    if config.get("use_dora"):
        problems.append("vLLM does not support DoRA (use_dora)")
    if config.get("bias", "none") != "none":
        problems.append(f"vLLM does not support adapter bias (bias={config.get('bias')!r})")
    if config.get("trainable_token_indices") is not None:
        problems.append("trainable_token_indices needs --max-lora-trainable-tokens; this export never sets it")
    if config.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, vLLM loads LORA adapters only")
    alpha = config.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        problems.append(f"lora_alpha must be a positive finite number, got {alpha!r}")
    return problems


def _positive_integer(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _read_tensors(folder: Path) -> dict[str, torch.Tensor] | str | None:
    """The adapter's weights; None when there is no weight file; a problem (text) when it cannot be read."""
    for name in _WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            try:
                if name.endswith(".safetensors"):
                    from safetensors.torch import load_file

                    tensors = load_file(str(path))
                else:
                    tensors = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # safetensors and torch.load raise their own types on damaged files
                return f"{name} cannot be read ({type(error).__name__}: {' '.join(str(error).split())[:200]})"
            if not isinstance(tensors, dict) or not all(isinstance(key, str) and isinstance(value, torch.Tensor)
                                                        for key, value in tensors.items()):
                return f"{name} does not hold named tensors"
            return tensors
    return None


def _tensor_problems(tensors: dict[str, torch.Tensor], rank: int, expected_suffix: str | None,
                     model=None) -> tuple[list[str], list[str]]:
    """Problems with the weight names, pairs, shapes and dtypes; and the modules found."""
    problems, pairs = [], {}
    for key, tensor in tensors.items():
        parsed = _module_of(key)
        if parsed is None:
            problems.append(f"{key} is not a weight name vLLM parses (<module>.lora_A.weight / .lora_B.weight)")
            continue
        module, side = parsed
        pairs.setdefault(module, {})[side] = tensor
        if tensor.dtype not in _FLOAT_DTYPES:
            problems.append(f"{key} has dtype {tensor.dtype}; vLLM expects float32, float16 or bfloat16")
        elif not torch.isfinite(tensor).all():
            problems.append(f"{key} holds NaN or infinite values")
    for module, sides in sorted(pairs.items()):
        if expected_suffix is not None and module.rsplit(".", 1)[-1] != expected_suffix:
            problems.append(f"module {module} is not one vLLM expects for this architecture ({expected_suffix})")
        if set(sides) != {"A", "B"}:
            problems.append(f"module {module} has lora_{''.join(sorted(sides))} only; vLLM needs both A and B")
            continue
        lora_a, lora_b = sides["A"], sides["B"]
        if lora_a.ndim != 2 or lora_b.ndim != 2 or lora_a.shape[0] != lora_b.shape[1] or lora_a.shape[0] > rank:
            problems.append(f"module {module}: A {tuple(lora_a.shape)} and B {tuple(lora_b.shape)} are not "
                            f"[r, in] and [out, r] with r <= {rank}")
        elif model is not None:
            problems.extend(_shape_against_model(model, module, lora_a, lora_b))
    return problems, sorted(pairs)


def _shape_against_model(model, module: str, lora_a: torch.Tensor, lora_b: torch.Tensor) -> list[str]:
    try:
        target = model.get_submodule(module)
    except AttributeError:
        return [f"module {module} does not exist in the model"]
    in_features = getattr(target, "in_features", None) or getattr(target, "nx", None)
    out_features = getattr(target, "out_features", None) or getattr(target, "nf", None)
    if (lora_a.shape[1], lora_b.shape[0]) != (in_features, out_features):
        return [(f"module {module}: adapter maps {lora_a.shape[1]} -> {lora_b.shape[0]}, the layer "
                f"{in_features} -> {out_features}")]
    return []


def check_vllm_adapter(folder: str | os.PathLike, architecture: str | None = None, model=None) -> VLLMAdapterCheck:
    """Run vLLM's adapter checks on an adapter folder; `architecture` (e.g. "LlamaForCausalLM") also checks
    that vLLM implements LoRA for it and the module names it expects; `model` also checks shapes."""
    folder = Path(folder)
    result = VLLMAdapterCheck()
    try:
        config = read_json(folder / "adapter_config.json", "adapter configuration")
    except CNAError as error:
        result.problems.append(f"adapter_config.json is missing or unreadable: {error}")
        return result
    if not isinstance(config, dict):
        result.problems.append(f"adapter_config.json holds a JSON {type(config).__name__}, not an object")
        return result
    result.problems.extend(_config_problems(config))
    rank = config.get("r") if _positive_integer(config.get("r")) else 0
    result.rank = rank
    expected_suffix = None
    if architecture is not None:
        expected_suffix = VLLM_LORA_DOWN_MODULES.get(architecture)
        if expected_suffix is None:
            result.problems.append(f"vLLM does not implement LoRA for {architecture}: serve the folded export")
    tensors = _read_tensors(folder)
    if tensors is None:
        result.problems.append(f"no adapter weights ({' or '.join(_WEIGHT_FILES)}) in {str(folder)!r}")
        return result
    if isinstance(tensors, str):
        result.problems.append(tensors)
        return result
    problems, modules = _tensor_problems(tensors, rank, expected_suffix, model)
    result.problems.extend(problems)
    result.modules = modules
    if not result.problems:
        result.problems.extend(vllm_loader_problems(folder))
    return result


def vllm_loader_problems(folder: str | os.PathLike) -> list[str]:
    """Where vLLM is importable, what its own loader (`PEFTHelper`: config, then `validate_legal`) says of the
    adapter folder; where it is not, nothing (the restated checks above are all there is)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return []
    try:
        from vllm.config.lora import LoRAConfig
        from vllm.lora.peft_helper import PEFTHelper

        helper = PEFTHelper.from_local_dir(str(folder), max_position_embeddings=8192)
        helper.validate_legal(LoRAConfig(max_lora_rank=serve_rank(helper.r) or VLLM_MAX_RANK, max_loras=1))
    except ImportError as error:  # a vLLM without these names: say so rather than pass silently
        return [f"vLLM is installed but its adapter loader could not be imported ({error})"]
    except Exception as error:  # whatever vLLM's loader raises is its verdict on the adapter
        return [f"vLLM's own loader refuses the adapter: {type(error).__name__}: {error}"]
    return []


def check_lora_rank_for_vllm(rank: int) -> None:
    """Refuse, before any work, an adapter rank no vLLM server can load."""
    if rank > VLLM_MAX_RANK:
        raise CNAError(f"the circuit has {rank} neurons in one layer, so its LoRA has rank {rank}, above vLLM's "
                       f"maximum --max-lora-rank {VLLM_MAX_RANK}: export the folded checkpoint instead "
                       "(cna export --format folded), which any engine serves, or pass check_vllm=False "
                       "(--no-vllm-check) for an adapter only PEFT loads")


def vllm_serving_instructions(adapter_dir: str | os.PathLike, base_model: str, rank: int,
                              name: str = "steered") -> str:
    """The `vllm serve` command that serves the adapter, and a request that selects it."""
    path = Path(adapter_dir).absolute()
    max_rank = serve_rank(rank)
    return (f"vLLM:  vllm serve {base_model} --enable-lora --max-lora-rank {max_rank} --lora-modules {name}={path}\n"
            f"       (--max-lora-rank takes one of {', '.join(map(str, VLLM_MAX_LORA_RANKS))}; "
            f"{max_rank} is the smallest that holds rank {rank})\n"
            f"A request selects the adapter by its name; the base model's name gives unsteered output:\n"
            f"  curl http://localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
            f"    -d '{{\"model\": \"{name}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'")


def _base_model_for_vllm(model) -> str:
    """A local folder vLLM can serve (the one the model was loaded from), else the model's name."""
    folder = getattr(model.config, "_name_or_path", "")
    return folder if folder and os.path.isdir(folder) else model_name(model)


def lora_serving_note(model, adapter_dir: str | os.PathLike) -> str:
    """What `cna export --format lora` prints: the vLLM command and request, or why vLLM cannot serve it."""
    rank = int(read_json(Path(adapter_dir) / "adapter_config.json", "adapter configuration")["r"])
    architecture = (getattr(model.config, "architectures", None) or [type(model).__name__])[0]
    if architecture not in VLLM_LORA_DOWN_MODULES:
        return (f"vLLM does not implement LoRA for {architecture}: PEFT loads this adapter; for vLLM serve the "
                "folded export (cna export --format folded)")
    if serve_rank(rank) is None:
        return (f"rank {rank} is above vLLM's maximum {VLLM_MAX_RANK}: PEFT loads this adapter; for vLLM use "
                "--format folded")
    note = vllm_serving_instructions(adapter_dir, _base_model_for_vllm(model), rank)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        note += ("\nThe adapter was computed from the bitsandbytes-quantized weights: serve the same base with "
                 "--quantization bitsandbytes")
    return note
