"""Shared fixtures: a small trained BPE tokenizer and tiny random-weight models, all offline."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers, bitsandbytes)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    """A BPE tokenizer trained here, with a ChatML-style chat template and a pad token."""
    return build_tokenizer()


@pytest.fixture(scope="session")
def plain_tokenizer():
    """The same tokenizer without a chat template: prompts go in as raw text."""
    return build_tokenizer(chat_template=False)


@pytest.fixture
def tiny_llama(tokenizer):
    torch.manual_seed(0)
    return build_tiny_model("llama", vocab_size=len(tokenizer))


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from cna_fast import load_model

    return load_model()
