"""GGUF files in: convert once into a cached Hugging Face folder keyed by the file's content.

transformers reads GGUF by dequantizing every tensor (slow: about 20 s for 135M parameters), so a
GGUF is converted once into a normal Hugging Face folder under the cache, named by the SHA-256 of
the file's bytes: a changed file gets a new folder, never a stale one. The digest itself is
memoized by (path, size, mtime, ctime, inode), so a big file is hashed once, not on every load.
The embedded default model and user GGUFs share this path. A loaded model remembers which GGUF it
came from (`gguf_source`), so the GGUF export can copy that file with the circuit folded in.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import read_json, write_text_atomic
from ..errors import CNAError

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
_INSTALL_HINT = "pip install gguf"
_DIGESTS_FILE = "gguf-digests.json"
_SOURCE_FILE = "cna_fast_gguf_source.json"
_CHUNK = 16 << 20


@dataclass(frozen=True)
class GGUFSource:
    """The GGUF file a model was loaded from, and the SHA-256 of its bytes at load time."""

    path: Path
    sha256: str


def cache_dir() -> Path:
    """Where converted models are kept: $CNA_FAST_CACHE, else $XDG_CACHE_HOME/cna_fast, else ~/.cache/cna_fast."""
    explicit = os.environ.get("CNA_FAST_CACHE")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".cache"
    return base / "cna_fast"


def is_gguf_file(path: str | os.PathLike) -> bool:
    """True for an existing file that starts with the GGUF magic bytes."""
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def looks_like_gguf(name: str | os.PathLike) -> bool:
    """A name meant as a GGUF file: it ends in .gguf, or it is a file that starts with the GGUF magic."""
    return str(name).lower().endswith(".gguf") or (os.path.isfile(name) and is_gguf_file(name))


def _stat_key(path: Path) -> dict:
    stat = path.stat()
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "ctime_ns": stat.st_ctime_ns, "inode": stat.st_ino}


def _read_digests(memo: Path) -> dict:
    """The digest memo (size-capped); a missing, damaged or foreign one is an empty memo (it only costs a re-hash)."""
    try:
        digests = read_json(memo, "GGUF digest memo")
    except CNAError:
        return {}
    if not isinstance(digests, dict):
        return {}
    return {path: entry for path, entry in digests.items()
            if isinstance(entry, dict) and isinstance(entry.get("sha256"), str)}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of the file's bytes, read in chunks; memoized per (path, size, mtime, ctime, inode) in the cache."""
    path = Path(path).resolve()
    key = _stat_key(path)
    memo = cache_dir() / _DIGESTS_FILE
    digests = _read_digests(memo)
    known = digests.get(str(path))
    if known and all(known.get(field) == value for field, value in key.items()):
        return known["sha256"]
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
    digest = hasher.hexdigest()
    if _stat_key(path) != key:
        raise CNAError(f"{str(path)!r} changed while it was being read: wait until it is fully written, then retry")
    digests = _read_digests(memo)  # another process may have added entries meanwhile
    digests[str(path)] = {**key, "sha256": digest}
    try:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps(digests, indent=1))
    except OSError as error:  # a read-only cache only costs a re-hash next time
        logger.warning("could not record the GGUF digest in %s: %s", memo, error)
    return digest


def _check_is_gguf(path: Path) -> None:
    """Cheap checks (no parsing): the file exists and starts with the GGUF magic."""
    if not path.is_file():
        raise CNAError(f"GGUF file {str(path)!r} does not exist: check the path")
    if not is_gguf_file(path):
        raise CNAError(f"{str(path)!r} is not a GGUF file (it does not start with 'GGUF'): pass a .gguf model file "
                       "or a Hugging Face model folder")


def _open_reader(path: Path):
    """A GGUFReader on `path`, or a CNAError naming what is wrong with the file."""
    if importlib.util.find_spec("gguf") is None:
        raise CNAError(f"reading GGUF files needs the gguf package: {_INSTALL_HINT}")
    from gguf import GGUFReader

    _check_is_gguf(path)
    try:
        return GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors... on a damaged file
        raise CNAError(f"GGUF file {str(path)!r} is corrupt or truncated ({type(error).__name__}: {error}): "
                       "download it again") from error


def _plain(architecture: str) -> str:
    """llama.cpp spells "qwen2moe" what transformers spells "qwen2_moe"."""
    return architecture.replace("_", "").replace("-", "")


def _readable_architectures() -> set[str]:
    """GGUF architectures this transformers reads: its legacy loader's and its newer loader's."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    names = set(GGUF_SUPPORTED_ARCHITECTURES)
    try:
        from transformers.integrations.gguf import GGUF_ARCHS

        names |= set(GGUF_ARCHS)
    except ImportError:
        pass
    return names


def _check_supported(path: Path) -> None:
    """Refuse split files and architectures transformers cannot read, before any conversion work."""
    reader = _open_reader(path)
    split = reader.fields.get("split.count")
    if split is not None and int(split.contents()) > 1:
        raise CNAError(f"{str(path)!r} is one part of a split GGUF: merge the parts first with llama.cpp's "
                       "`llama-gguf-split --merge FIRST_PART merged.gguf`")
    field = reader.fields.get("general.architecture")
    architecture = field.contents() if field is not None else None
    if architecture is None:
        raise CNAError(f"GGUF file {str(path)!r} has no general.architecture key: it is not a model file")
    readable = _readable_architectures()
    if _plain(architecture) not in {_plain(known) for known in readable}:
        raise CNAError(f"GGUF architecture {architecture!r} of {str(path)!r} cannot be read by transformers (it reads "
                       f"{', '.join(sorted(readable))}): use the model's Hugging Face folder")
    _check_shapes(reader, str(architecture), path)


MAX_BLOCKS = 4096  # the deepest models have ~130 blocks
MAX_WIDTH = 1 << 24


def _metadata_int(reader, key: str, path: Path) -> int | list[int] | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_WIDTH for v in values):
        raise CNAError(f"GGUF file {str(path)!r}: metadata {key} is {str(value)[:80]}, not a size in 0..{MAX_WIDTH}: "
                       "the file is damaged or crafted")
    return value


def _check_shapes(reader, architecture: str, path: Path) -> None:
    """The sizes in the metadata against the tensor table, bounded, before any model is built from them.

    transformers builds the model from the metadata and then fills it from the tensors; sizes that
    disagree would allocate for the metadata (block_count 100000: gigabytes) or leave weights newly
    initialized. Tensor shapes are in ggml order: token_embd [n_embd, n_vocab], ffn_down [n_ff, n_embd].
    """
    where = f"GGUF file {str(path)!r}"
    blocks = _metadata_int(reader, f"{architecture}.block_count", path)
    embedding = _metadata_int(reader, f"{architecture}.embedding_length", path)
    feed_forward = _metadata_int(reader, f"{architecture}.feed_forward_length", path)
    shapes = {tensor.name: [int(n) for n in tensor.shape] for tensor in reader.tensors}
    present = sorted({int(name.split(".")[1]) for name in shapes if name.startswith("blk.")
                      and name.split(".")[1].isdigit()})
    if blocks is None or isinstance(blocks, list) or not 1 <= blocks <= MAX_BLOCKS:
        raise CNAError(f"{where}: metadata {architecture}.block_count is {blocks!r}, not a layer count in 1.."
                       f"{MAX_BLOCKS}: the file is damaged or crafted")
    if present != list(range(blocks)):
        raise CNAError(f"{where}: metadata says {blocks} blocks but the tensor table holds blocks "
                       f"{_span(present)}: the file is damaged or crafted")
    embd = shapes.get("token_embd.weight")
    if isinstance(embedding, int) and embd is not None and embd[0] != embedding:
        raise CNAError(f"{where}: metadata {architecture}.embedding_length is {embedding} but token_embd.weight is "
                       f"{embd[0]} wide: the file is damaged or crafted")
    for block in present:
        down = shapes.get(f"blk.{block}.ffn_down.weight")
        if down is None:
            continue  # an expert layer (ffn_down_exps) or another layout: transformers reports what it cannot read
        width = feed_forward[block] if isinstance(feed_forward, list) and block < len(feed_forward) else feed_forward
        expected = [width if isinstance(width, int) else down[0], embedding if isinstance(embedding, int) else down[1]]
        if len(down) != 2 or down != expected:
            raise CNAError(f"{where}: blk.{block}.ffn_down.weight has shape {down} (ggml order), but the metadata "
                           f"gives [feed_forward_length {width}, embedding_length {embedding}]: the file is damaged "
                           "or crafted; a model is never built from it with newly initialized weights")
        for part in ("ffn_up", "ffn_gate"):
            shape = shapes.get(f"blk.{block}.{part}.weight")
            if shape is not None and shape != expected[::-1]:
                raise CNAError(f"{where}: blk.{block}.{part}.weight has shape {shape} (ggml order), expected "
                               f"{expected[::-1]} from the metadata: the file is damaged or crafted")


def _span(blocks: list[int]) -> str:
    if not blocks:
        return "none"
    return f"{blocks[0]}..{blocks[-1]} ({len(blocks)} blocks)"


def _convert(path: Path, staging: Path) -> None:
    """Dequantize the GGUF through transformers and save model and tokenizer as a Hugging Face folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                           output_loading_info=True)
    except (ValueError, KeyError, NotImplementedError, RuntimeError) as error:
        raise CNAError(f"transformers could not convert GGUF {str(path)!r}: {' '.join(str(error).split())[:300]}. "
                       "Use the model's Hugging Face folder instead") from error
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    missing = sorted(set(info.get("missing_keys") or ()) - tied)
    mismatched = list(info.get("mismatched_keys") or ())
    if missing or mismatched:  # those weights would be newly initialized: never convert, never cache them
        shown = ", ".join(str(key if isinstance(key, str) else key[0]) for key in [*mismatched, *missing][:3])
        raise CNAError(f"GGUF {str(path)!r} does not fill the model its metadata describes ({len(mismatched)} tensors "
                       f"of the wrong shape, {len(missing)} missing; first: {shown}): the file is damaged; use the "
                       "model's Hugging Face folder")
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # the weights are dequantized float32 now
        del config.quantization_config
    with torch.device("meta"):  # transformers will not save a GGUF model: a plain one takes its tensors, no copy
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    try:
        plain.load_state_dict(model.state_dict(), assign=True)
    except RuntimeError as error:  # weights transformers keeps in GGUF blocks do not fit a plain model
        raise CNAError(f"GGUF {str(path)!r} could not be converted to plain weights ({error}): use the model's "
                       "Hugging Face folder instead") from error
    plain.generation_config = model.generation_config
    del model
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)


def converted_dir(path: str | os.PathLike) -> Path:
    """The cached Hugging Face folder of GGUF file `path`, converted on first use.

    The folder is named by the file's SHA-256, written to a temporary folder and renamed into
    place, so a crash or a concurrent process never leaves a half-written model behind.
    """
    path = Path(path).expanduser()
    _check_is_gguf(path)
    digest = file_digest(path)
    target = cache_dir() / f"gguf-{digest[:32]}"
    if (target / "config.json").is_file():  # converted before: these bytes were read successfully then
        return target
    _check_supported(path)  # parses the metadata (seconds for a big vocabulary), so only before converting
    logger.warning("converting %s from GGUF to a cached Hugging Face folder (once): %s", path.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _convert(path, staging)
        (staging / _SOURCE_FILE).write_text(json.dumps({"gguf_file": path.name, "sha256": digest}, indent=2))
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # not a lost race with another converter
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return target


def record_gguf_source(model, path: str | os.PathLike) -> None:
    """Remember on `model` the GGUF file it was converted from (read by `gguf_source`)."""
    path = Path(path).expanduser().resolve()
    model.cna_fast_gguf = GGUFSource(path=path, sha256=file_digest(path))


def gguf_source(model) -> Path | None:
    """The GGUF file `model` was loaded from (`load_model("x.gguf")` or the embedded default), else None."""
    source = getattr(model, "cna_fast_gguf", None)
    return source.path if source is not None else None
