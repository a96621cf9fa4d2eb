"""GGUF out: the source GGUF with the circuit folded into its down projections, for llama.cpp and Ollama.

Every metadata key and every tensor is copied from the GGUF the model was loaded from, byte for
byte, except `blk.N.ffn_down.weight` of the circuit's layers: those are dequantized, their columns
of the circuit's neurons are scaled by the multiplier (exactly what steering does to the
activations), and they are written in a type llama.cpp reads (F32, F16, BF16 or Q8_0).

Layout: a GGUF tensor of ggml shape [n_in, n_out] reads in numpy as [n_out, n_in], the same
orientation as a Hugging Face Linear weight, so neuron j is column j. llama.cpp's converter
permutes the rows of attn_q and attn_k only; ffn_down is stored unpermuted.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .._io import atomic_path
from .._version import __version__
from ..circuit import Circuit, as_multiplier
from ..errors import CNAError
from ..models import get_adapter
from ..models.gguf_files import file_digest

GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0")
_METADATA_PREFIX = "cna_fast."
_PROVENANCE_KEYS = ("version", "multiplier", "source.sha256")  # written by _add_provenance into every export
_NOT_FROM_GGUF = (
    "this model was not loaded from a GGUF file, so there is no GGUF to copy: export the folded checkpoint "
    "(cna export --format folded --out steered/), then convert it with llama.cpp's own converter "
    "(python convert_hf_to_gguf.py steered/ --outfile steered.gguf), or load the model from its .gguf file"
)


def default_gguf_type(source_type: str) -> str:
    """The source tensor's own type when llama.cpp reads it as written here, else F16 (no further loss)."""
    return source_type if source_type in GGUF_TYPES else "F16"


def gguf_source_file(model):
    source = getattr(model, "cna_fast_gguf", None)
    if source is None:
        raise CNAError(_NOT_FROM_GGUF)
    if not source.path.is_file():
        raise CNAError(f"the model's GGUF file {str(source.path)!r} is gone: load the model again from its GGUF")
    if file_digest(source.path) != source.sha256:
        raise CNAError(f"{str(source.path)!r} changed since the model was loaded from it: load the model again")
    return source


def is_previous_export(path: str | os.PathLike) -> bool:
    """True when `path` is a GGUF file this tool wrote (it carries the `cna_fast.*` provenance keys)."""
    from ..models.gguf_files import is_gguf_file

    if not Path(path).is_file() or not is_gguf_file(path):
        return False
    try:
        from gguf import GGUFReader

        fields = GGUFReader(path).fields
    except Exception:  # a damaged file is not a previous export
        return False
    return all(f"{_METADATA_PREFIX}{key}" in fields for key in _PROVENANCE_KEYS)


def check_gguf_output(out: str | os.PathLike, force: bool, *, previous: Callable[[Path], bool] = is_previous_export,
                      what: str = f"GGUF export of cna_fast (it has no {_METADATA_PREFIX}* provenance keys)",
                      example: str = "steered.gguf") -> Path:
    """Refuse a folder, a missing parent, or an existing file, before any work is done.

    An existing file is replaced only with `force`, and only when `previous` says it is a previous export of
    this tool (by default a GGUF carrying the `cna_fast.*` provenance keys): --force never replaces another
    model. `what` names such an export in the message; `example` is a file name to suggest.
    """
    out = Path(out)
    if out.is_dir():
        raise CNAError(f"output {str(out)!r} is a folder: give a file name such as {example}")
    if not out.absolute().parent.is_dir():
        raise CNAError(f"parent folder of {str(out)!r} does not exist: create it first")
    if out.exists() or out.is_symlink():
        if not force:
            raise CNAError(f"output file {str(out)!r} exists: choose another name, or pass force=True (--force) to "
                           "replace a previous export")
        if out.is_symlink() or not previous(out):
            raise CNAError(f"output file {str(out)!r} exists and is not a {what}: --force only replaces previous "
                           "exports; choose another name")
    return out


def _down_tensor(tensors: dict, layer: int):
    name = f"blk.{layer}.ffn_down.weight"
    if name in tensors:
        return tensors[name]
    if f"blk.{layer}.ffn_down_exps.weight" in tensors:
        raise CNAError(f"layer {layer} of this GGUF is a mixture of experts (blk.{layer}.ffn_down_exps): the GGUF "
                       "export does not fold expert tensors yet; use the folded or LoRA export")
    raise CNAError(f"the GGUF has no tensor {name!r}: its architecture is not one the GGUF export knows")


# The largest magnitude each written type holds (Q8_0: 127 x its float16 block scale).
_LARGEST = {"F32": float(np.finfo(np.float32).max), "F16": 65504.0, "BF16": 3.3895313892515355e38,
            "Q8_0": 65504.0 * 127}


def _check_fits(name: str, columns: np.ndarray, gguf_type: str, multiplier: float) -> None:
    """Refuse scaled weights that are not finite in `gguf_type`; suggest only the types that do hold them."""
    largest = float(np.abs(columns).max()) if columns.size else 0.0
    if math.isfinite(largest) and largest <= _LARGEST[gguf_type]:
        return
    fitting = [kind for kind in GGUF_TYPES if math.isfinite(largest) and largest <= _LARGEST[kind]]
    way_out = (f"use --gguf-type {' or '.join(fitting)}" if fitting
               else "no GGUF type holds them: use a smaller --multiplier")
    raise CNAError(f"{name} scaled by multiplier {multiplier:g} reaches |w| = {largest:.4g}, beyond {gguf_type}'s "
                   f"largest value {_LARGEST[gguf_type]:.4g} (it would be written as infinity): {way_out}")


def _requantize(weight: np.ndarray, gguf_type: str) -> np.ndarray:
    """`weight` (float32 [out, in]) in the storage of `gguf_type`, as GGUFWriter takes it."""
    from gguf import GGMLQuantizationType, quants

    if gguf_type == "F32":
        return weight.astype(np.float32)
    if gguf_type == "F16":
        stored = weight.astype(np.float16)
        if not np.isfinite(stored).all():
            raise CNAError("the scaled weights overflow float16 (|w| > 65504): use --gguf-type BF16 or F32")
        return stored
    if gguf_type == "Q8_0" and weight.shape[-1] % 32:
        raise CNAError(f"Q8_0 needs rows whose length is a multiple of 32, these have {weight.shape[-1]}: "
                       "use --gguf-type F16")
    return quants.quantize(weight, GGMLQuantizationType[gguf_type])


def scaled_down_weights(reader, by_layer: dict, multiplier: float, widths: list[int],
                        gguf_type: str | None) -> dict[str, tuple[np.ndarray, str]]:
    """Tensor name -> (new storage, type name) for the down projection of every circuit layer."""
    from gguf import quants

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    replaced = {}
    for layer, neurons in sorted(by_layer.items()):
        tensor = _down_tensor(tensors, layer)
        source_type = tensor.tensor_type.name
        try:
            weight = np.array(quants.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
        except NotImplementedError as error:
            raise CNAError(f"{tensor.name} is stored as {source_type}, which the gguf package cannot dequantize: "
                           "update it (pip install -U gguf)") from error
        if weight.ndim != 2 or weight.shape[1] != widths[layer]:
            raise CNAError(f"{tensor.name} has shape {tuple(weight.shape)}, expected [hidden, {widths[layer]}]: "
                           "this GGUF does not match the model the circuit was validated on")
        written = gguf_type or default_gguf_type(source_type)
        columns = weight[:, neurons.numpy()].astype(np.float64) * multiplier
        _check_fits(tensor.name, columns, written, multiplier)
        weight[:, neurons.numpy()] = columns.astype(np.float32)
        replaced[tensor.name] = (_requantize(weight, written), written)
    return replaced


def _copy_metadata(reader, writer) -> None:
    """Every key of the source except the ones GGUFWriter writes itself and earlier cna_fast provenance."""
    from gguf import GGUFValueType

    for field in reader.fields.values():
        if field.name.startswith(("GGUF.", _METADATA_PREFIX)) or field.name == "general.architecture":
            continue
        if field.name == "general.alignment":
            writer.add_custom_alignment(int(field.contents()))
            continue
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)


def _add_provenance(writer, circuit: Circuit, multiplier: float, source, types: dict[str, str]) -> None:
    writer.add_string(f"{_METADATA_PREFIX}version", __version__)
    writer.add_float64(f"{_METADATA_PREFIX}multiplier", multiplier)
    writer.add_uint32(f"{_METADATA_PREFIX}neurons", len(circuit))
    writer.add_array(f"{_METADATA_PREFIX}circuit.layers", [int(v) for v in circuit.layers])
    writer.add_array(f"{_METADATA_PREFIX}circuit.neurons", [int(v) for v in circuit.neurons])
    writer.add_string(f"{_METADATA_PREFIX}circuit.meta", json.dumps(circuit.meta, default=str))
    writer.add_string(f"{_METADATA_PREFIX}source.file", source.path.name)
    writer.add_string(f"{_METADATA_PREFIX}source.sha256", source.sha256)
    writer.add_string(f"{_METADATA_PREFIX}tensor_types", json.dumps(types))


def export_gguf(model, circuit: Circuit, multiplier: float, out_path: str | os.PathLike, *,
                gguf_type: str | None = None, force: bool = False, progress: bool = False) -> Path:
    """Write a copy of the model's source GGUF with the circuit folded in at `multiplier`.

    gguf_type: the type of the rewritten ffn_down tensors, one of F32, F16, BF16, Q8_0; None keeps
        each tensor's own type where it is one of those, else writes F16.
    Only the circuit layers' `blk.N.ffn_down.weight` change; every other tensor and metadata key is
    copied unchanged, and provenance is added under `cna_fast.*` keys. The file appears atomically.
    """
    from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

    multiplier = as_multiplier(multiplier)
    if gguf_type is not None and gguf_type not in GGUF_TYPES:
        raise CNAError(f"unknown GGUF tensor type {gguf_type!r}: choose one of {', '.join(GGUF_TYPES)}")
    source = gguf_source_file(model)
    if Path(out_path).exists() and Path(out_path).resolve() == source.path.resolve():
        raise CNAError(f"output {str(out_path)!r} is the source GGUF itself: write to another file")
    out_path = check_gguf_output(out_path, force)
    circuit.validate(model)
    if len(circuit) == 0:
        raise CNAError("the circuit has no neurons: there is nothing to export")
    reader = GGUFReader(source.path)
    if reader.endianess.name != "LITTLE":
        raise CNAError(f"{str(source.path)!r} is a big-endian GGUF: the export writes little-endian files only")
    replaced = scaled_down_weights(reader, circuit.by_layer(), multiplier, get_adapter(model).widths, gguf_type)
    with atomic_path(out_path) as staging:
        writer = GGUFWriter(staging, arch=str(reader.fields["general.architecture"].contents()))
        _copy_metadata(reader, writer)
        _add_provenance(writer, circuit, multiplier, source, {name: kind for name, (_, kind) in replaced.items()})
        for tensor in reader.tensors:
            if tensor.name in replaced:
                data, kind = replaced[tensor.name]
                writer.add_tensor(tensor.name, data, raw_dtype=GGMLQuantizationType[kind])
            else:
                writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        check_gguf_output(out_path, force)  # again, just before the replace: the file may have changed meanwhile
    return out_path


def gguf_serving_instructions(out_path: str | os.PathLike, name: str = "steered") -> str:
    """How to run the exported file with llama.cpp and Ollama (printed by `cna export --format gguf`)."""
    path = Path(out_path).absolute()
    return (f"llama.cpp:  llama-cli -m {path} -cnv      (or: llama-server -m {path} --port 8080)\n"
            f"Ollama:     printf 'FROM {path}\\n' > Modelfile && ollama create {name} -f Modelfile "
            f"&& ollama run {name}\n"
            "            (Ollama applies the chat template stored in the GGUF; add TEMPLATE/PARAMETER lines to "
            "the Modelfile to override it)")
