"""Model loading and architecture adapters."""
from .adapters import ARCHITECTURES, ArchSpec, ModelAdapter, cache_keyword, find_cache, get_adapter
from .gguf_files import gguf_source
from .loading import DEFAULT_MODEL_NAME, cache_dir, default_model_dir, load_model, model_name

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "DEFAULT_MODEL_NAME",
    "ModelAdapter",
    "cache_dir",
    "cache_keyword",
    "default_model_dir",
    "find_cache",
    "get_adapter",
    "gguf_source",
    "load_model",
    "model_name",
]
