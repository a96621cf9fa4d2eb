"""Benchmarks share the embedded default model and the bundled French/English prompt sets."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from cna_fast.prompts import bundled_prompts  # noqa: E402

N_PER_SIDE = 128


_MODELS: dict = {}


@pytest.fixture(params=["float32", "bfloat16"])
def default_model(request):
    """The embedded default model in float32 (the default) and bfloat16 (fast on CPUs with AMX)."""
    from cna_fast import load_model

    if request.param not in _MODELS:
        _MODELS[request.param] = load_model(dtype=request.param)
    return _MODELS[request.param]


@pytest.fixture(scope="session")
def contrast_prompts():
    """128 positive (French) and 128 negative (English) questions."""
    return bundled_prompts("french_questions")[:N_PER_SIDE], bundled_prompts("english_questions")[:N_PER_SIDE]
