"""Benchmarks share the embedded default model and the bundled French/English prompt sets."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from cna_fast.prompts import bundled_prompts  # noqa: E402

N_PER_SIDE = 128


@pytest.fixture(scope="session")
def default_model():
    from cna_fast import load_model

    return load_model()


@pytest.fixture(scope="session")
def contrast_prompts():
    """128 positive (French) and 128 negative (English) questions."""
    return bundled_prompts("french_questions")[:N_PER_SIDE], bundled_prompts("english_questions")[:N_PER_SIDE]
