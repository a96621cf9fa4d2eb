"""GGUF LoRA out: a circuit as the adapter llama.cpp (llama-server, Ollama's ADAPTER) applies per request.

llama.cpp's GGUF LoRA format (src/llama-adapter.cpp, src/llama-graph.cpp of the vendored llama.cpp):
- tensors `<base tensor>.lora_a` / `.lora_b`, here `blk.N.ffn_down.weight.lora_a` with numpy shape
  A [r, n_ff] and `.lora_b` B [n_embd, r] (ggml ne reversed: the loader checks
  `base.ne[0] == a.ne[0]`, `base.ne[1] == b.ne[1]`, `a.ne[1] == b.ne[0]`);
- metadata `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32), and
  `general.architecture` equal to the base model's (else "model arch and LoRA arch mismatch");
- the update added to `W x` is `scale_t * B (A x)` with `scale_t = s * alpha / rank_t` when alpha is
  nonzero (`llama_adapter_lora_weight::get_scale`, rank_t = B's ne[0], per tensor), `s` the per-request
  scale; alpha is one number for the whole file;
- expert tensors (`blk.N.ffn_down_exps.weight`, numpy [E, n_embd, n_ff]) go through
  `build_lora_mm_id`, which takes 3-D stacked A [E, r, n_ff] and B [E, n_embd, r].

Every tensor here is padded to one rank R (zero rows of A, zero columns of B, which add nothing) and
alpha = R, so `scale_t = s` exactly in every layer. With A = one-hot rows of the circuit neurons and
B = (m - 1) * W[:, neurons], where W is the GGUF's own ffn_down dequantized (the tensor the server
multiplies), a request at scale s computes `W x + s (m - 1) W[:, n] h_n`: the circuit at multiplier
`1 + s (m - 1)`. The server keeps W in its quantized type; B is float32.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .._io import atomic_path
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError
from .gguf import gguf_source_file, check_gguf_output

FORMAT = "gguf-lora"
_PREFIX = "cna_fast."
# Hugging Face model_type -> llama.cpp's architecture name, for models not loaded from a GGUF (the
# converter maps these; Mistral is written as llama).
HF_TO_LLAMA_CPP = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
                   "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3", "phi3": "phi3",
                   "olmo2": "olmo2", "granite": "granite"}


def effective_multiplier(multiplier: float, scale: float) -> float:
    """The circuit's multiplier when an adapter exported at `multiplier` is applied at lora scale `scale`."""
    return 1.0 + float(scale) * (float(multiplier) - 1.0)


def lora_scale_for(adapter_multiplier: float, wanted: float) -> float:
    """The lora scale that makes an adapter exported at `adapter_multiplier` steer at multiplier `wanted`."""
    if adapter_multiplier == 1.0:
        raise CNAError("an adapter exported at multiplier 1 is the identity: it cannot steer at any scale")
    return (float(wanted) - 1.0) / (float(adapter_multiplier) - 1.0)


def lora_pair(weight: np.ndarray, neurons: np.ndarray, multiplier: float, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """A [.., rank, n_ff] one-hot rows and B [.., n_out, rank] = (m - 1) * weight[.., :, neurons], zero-padded.

    weight: [n_out, n_ff] (dense) float32. Rows/columns past len(neurons) stay zero.
    """
    count = len(neurons)
    if count > rank:
        raise ValueError(f"{count} neurons do not fit rank {rank}")
    lora_a = np.zeros((rank, weight.shape[-1]), dtype=np.float32)
    lora_a[np.arange(count), neurons] = 1.0
    lora_b = np.zeros((weight.shape[0], rank), dtype=np.float32)
    lora_b[:, :count] = np.float32(multiplier - 1.0) * weight[:, neurons]
    return lora_a, lora_b


def _dequantized(tensor) -> np.ndarray:
    from gguf import quants

    try:
        return np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError as error:
        raise CNAError(f"{tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot "
                       "dequantize: update it (pip install -U gguf)") from error


def _check_finite(values: np.ndarray, name: str, multiplier: float) -> None:
    if not np.isfinite(values).all():
        raise CNAError(f"multiplier {multiplier:g} makes {name} overflow float32: use a smaller multiplier")


def adapter_tensors_from_gguf(reader, circuit: Circuit, multiplier: float) -> dict[str, np.ndarray]:
    """{name: array} of the adapter for the GGUF `reader`: dense layers and (3-D) routed experts."""
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    by_layer, by_expert = circuit.by_layer(), circuit.by_expert()
    rank = max(neurons.numel() for neurons in [*by_layer.values(), *by_expert.values()])
    out: dict[str, np.ndarray] = {}
    for layer, neurons in sorted(by_layer.items()):
        name = next((candidate for candidate in (f"blk.{layer}.ffn_down.weight", f"blk.{layer}.ffn_down_shexp.weight")
                     if candidate in tensors), None)
        if name is None:
            raise CNAError(f"the GGUF has no tensor blk.{layer}.ffn_down.weight (nor a shared expert's "
                           f"ffn_down_shexp): its architecture is not one the GGUF LoRA export knows")
        weight = _dequantized(tensors[name])
        if weight.ndim != 2 or int(neurons.max()) >= weight.shape[1]:
            raise CNAError(f"{name} has shape {tuple(weight.shape)}, too narrow for neuron {int(neurons.max())}: "
                           "this GGUF does not match the model the circuit was found on")
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = lora_pair(weight, neurons.numpy(), multiplier, rank)
    for layer in sorted({layer for layer, _ in by_expert}):
        name = f"blk.{layer}.ffn_down_exps.weight"
        if name not in tensors:
            raise CNAError(f"the circuit has routed-expert neurons in layer {layer}, but the GGUF has no {name} "
                           "(separate per-expert tensors are not supported): use the folded export")
        weight = _dequantized(tensors[name])  # [E, n_embd, n_ff]
        if weight.ndim != 3:
            raise CNAError(f"{name} has shape {tuple(weight.shape)}, expected [experts, hidden, width]")
        count = weight.shape[0]
        lora_a = np.zeros((count, rank, weight.shape[2]), dtype=np.float32)
        lora_b = np.zeros((count, weight.shape[1], rank), dtype=np.float32)
        for (owner, expert), neurons in by_expert.items():
            if owner != layer:
                continue
            if expert >= count or int(neurons.max()) >= weight.shape[2]:
                raise CNAError(f"{name} has shape {tuple(weight.shape)}, too small for expert {expert} neuron "
                               f"{int(neurons.max())}: this GGUF does not match the circuit's model")
            lora_a[expert], lora_b[expert] = lora_pair(weight[expert], neurons.numpy(), multiplier, rank)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = lora_a, lora_b
    for name, values in out.items():
        _check_finite(values, name, multiplier)
    return out


def adapter_tensors_from_model(model, circuit: Circuit, multiplier: float) -> dict[str, np.ndarray]:
    """The adapter computed from a Hugging Face model's own down projections (dense circuits only)."""
    from .hf import weight_columns
    from ..models import get_adapter

    if circuit.by_expert():
        raise CNAError("routed-expert neurons need the model's GGUF (load the model from its .gguf file): the "
                       "expert tensors' layout in llama.cpp is read from that file")
    adapter = get_adapter(model)
    by_layer = circuit.by_layer()
    rank = max(neurons.numel() for neurons in by_layer.values())
    out = {}
    for layer, neurons in sorted(by_layer.items()):
        columns = weight_columns(adapter.neuron_site(layer), neurons).numpy()  # [out, k]
        width = adapter.widths[layer]
        lora_a = np.zeros((rank, width), dtype=np.float32)
        lora_a[np.arange(len(neurons)), neurons.numpy()] = 1.0
        lora_b = np.zeros((columns.shape[0], rank), dtype=np.float32)
        lora_b[:, :len(neurons)] = np.float32(multiplier - 1.0) * columns
        name = f"blk.{layer}.ffn_down.weight"
        _check_finite(lora_b, name, multiplier)
        out[f"{name}.lora_a"], out[f"{name}.lora_b"] = lora_a, lora_b
    return out


def read_provenance(path: str | os.PathLike) -> dict | None:
    """The cna_fast keys of a GGUF LoRA written here ({key without prefix: value}), None for any other file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception:  # not a GGUF, or a damaged one: not ours either way
        return None
    fields = {name[len(_PREFIX):]: field.contents() for name, field in reader.fields.items()
              if name.startswith(_PREFIX)}
    if fields.get("format") != FORMAT:
        return None
    return fields


def check_gguf_lora_output(out: str | os.PathLike, force: bool) -> Path:
    """Refuse a folder, a missing parent, an existing file without --force, or (with it) any file that is not a
    previous GGUF LoRA export."""
    return check_gguf_output(out, force, previous=lambda path: read_provenance(path) is not None,
                             what="GGUF LoRA written by cna export (--format gguf-lora)", example="steer.gguf")


def _architecture_of(model) -> tuple[str, object | None]:
    """(llama.cpp architecture name, the GGUF source or None)."""
    if getattr(model, "cna_fast_gguf", None) is not None:
        source = gguf_source_file(model)
        return "", source
    model_type = getattr(model.config, "model_type", "")
    if model_type not in HF_TO_LLAMA_CPP:
        raise CNAError(f"llama.cpp's name for architecture {model_type!r} is not known here: load the model from "
                       "its .gguf file (cna export --model model.gguf ...)")
    return HF_TO_LLAMA_CPP[model_type], None


def export_gguf_lora(model, circuit: Circuit, multiplier: float, out_path: str | os.PathLike, *,
                     force: bool = False) -> Path:
    """Write the circuit at `multiplier` as a llama.cpp GGUF LoRA on the down projections.

    For a model loaded from a GGUF (the embedded default, `load_model("x.gguf")`), B is computed from
    that file's own ffn_down tensors, dequantized: the exact weights llama-server multiplies. For a
    Hugging Face model, from its weights (exact for a GGUF converted from them in F32/F16; a quantized
    GGUF then differs by its quantization error). A request at lora scale s steers at 1 + s (m - 1).
    force: replace a previous GGUF LoRA export (recognized by its cna_fast.format key), never another file.
    """
    from gguf import GGUFReader

    multiplier = as_multiplier(multiplier)
    out_path = check_gguf_lora_output(out_path, force)
    circuit.validate(model)
    if len(circuit) == 0:
        raise CNAError("the circuit has no neurons: there is nothing to export")
    if multiplier == 1.0:
        raise CNAError("multiplier 1 is the identity: the adapter would be all zeros. Export at the multiplier "
                       "whose effect you want at scale 1 (e.g. 0 to ablate); requests then choose 1 + s (m - 1)")
    architecture, source = _architecture_of(model)
    if source is not None:
        if out_path.exists() and out_path.resolve() == source.path.resolve():
            raise CNAError(f"output {str(out_path)!r} is the source GGUF itself: write to another file")
        reader = GGUFReader(source.path)
        if reader.endianess.name != "LITTLE":
            raise CNAError(f"{str(source.path)!r} is a big-endian GGUF: the export writes little-endian files only")
        architecture = str(reader.fields["general.architecture"].contents())
        tensors = adapter_tensors_from_gguf(reader, circuit, multiplier)
        source_file, source_sha = source.path.name, source.sha256
    else:
        tensors = adapter_tensors_from_model(model, circuit, multiplier)
        source_file, source_sha = str(getattr(model, "name_or_path", "")), ""
    with atomic_path(out_path) as staging:
        _write_adapter(staging, architecture, tensors, circuit, multiplier, source_file, source_sha)
    return out_path


def _write_adapter(path: Path, architecture: str, tensors: dict[str, np.ndarray], circuit: Circuit,
                   multiplier: float, source_file: str, source_sha: str) -> None:
    """The adapter file: llama.cpp's keys (alpha = the common rank), cna_fast provenance, the tensors."""
    from gguf import GGUFWriter

    from .._version import __version__

    rank = next(values for name, values in tensors.items() if name.endswith(".lora_b")).shape[-1]  # B [.., out, r]
    writer = GGUFWriter(path, arch=architecture)
    writer.add_string("general.type", "adapter")
    writer.add_string("general.name", f"cna_fast circuit x{multiplier:g}")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", float(rank))
    writer.add_string(f"{_PREFIX}format", FORMAT)
    writer.add_string(f"{_PREFIX}version", __version__)
    writer.add_float64(f"{_PREFIX}multiplier", multiplier)
    writer.add_uint32(f"{_PREFIX}rank", int(rank))
    writer.add_uint32(f"{_PREFIX}neurons", len(circuit))
    writer.add_array(f"{_PREFIX}circuit.layers", [int(v) for v in circuit.layers])
    writer.add_array(f"{_PREFIX}circuit.neurons", [int(v) for v in circuit.neurons])
    if circuit.experts is not None:
        writer.add_array(f"{_PREFIX}circuit.experts", [int(v) for v in circuit.experts])
    writer.add_string(f"{_PREFIX}circuit.meta", json.dumps(circuit.meta, default=str))
    writer.add_string(f"{_PREFIX}source.file", source_file)
    writer.add_string(f"{_PREFIX}source.sha256", source_sha)
    for name, values in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_lora_instructions(out_path: str | os.PathLike, base_gguf: str | os.PathLike | None,
                           multiplier: float) -> str:
    """The server command and a request (printed by `cna export --format gguf-lora`)."""
    path = Path(out_path).absolute()
    base = Path(base_gguf).absolute() if base_gguf else "BASE_MODEL.gguf"
    half = effective_multiplier(multiplier, 0.5)
    return (f"llama-server -m {base} --lora-scaled {path}:0 --lora-init-without-apply --cache-ram 0 --port 8080\n"
            "curl -s localhost:8080/completion -d '{\"prompt\": \"...\", \"n_predict\": 64, "
            "\"lora\": [{\"id\": 0, \"scale\": 1.0}]}'\n"
            f"A request at lora scale s steers at multiplier 1 + s*({multiplier:g} - 1): scale 1 -> x{multiplier:g}, "
            f"scale 0.5 -> x{half:g}, scale 0 -> unsteered. A request without \"lora\" gets the scale the "
            "adapter was loaded with: 0 with --lora-scaled FILE:0 (--lora FILE loads it at 1). Send \"lora\" with "
            "every request: the server reuses a slot's cached prompt without one. --cache-ram 0: the host prompt "
            "cache keeps no lora scale, so a prompt cached under one scale could be reused under another.\n"
            "Send prompts formatted with the model's Hugging Face chat template (as token ids, or as text to "
            "/completion): /v1/chat/completions formats them with the server's own template, which may differ.\n"
            f"Ollama: printf 'FROM {base}\\nADAPTER {path}\\n' > Modelfile && ollama create steered -f Modelfile "
            "(Ollama applies the adapter at scale 1)")
