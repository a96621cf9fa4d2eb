"""Shared fixtures: a small trained BPE tokenizer and tiny random-weight models, all offline."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (transformers, bitsandbytes)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.tiny import build_tiny_model, build_tokenizer  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread_for_tiny_models(request):
    """Tiny models run fastest on one intra-op thread (more only adds sync cost, worse on a busy machine);
    the embedded default model's tests keep every core."""
    if request.module.__name__.endswith("test_default_model"):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


POSITIVE = ["zebra stripes on the savanna", "the zebra runs fast", "a zebra and a fox", "zebra zebra"]
NEGATIVE = ["the quick brown fox", "how do i bake bread", "write a python function", "explain photosynthesis"]


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny random Llama and the test tokenizer saved as a Hugging Face folder (for CLI and torchrun)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer()
    build_tiny_model("llama", len(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def prompt_files(tmp_path):
    """POSITIVE and NEGATIVE written as .txt prompt files."""
    positive, negative = tmp_path / "pos.txt", tmp_path / "neg.txt"
    positive.write_text("\n".join(POSITIVE) + "\n")
    negative.write_text("\n".join(NEGATIVE) + "\n")
    return positive, negative


@pytest.fixture(scope="session")
def circuit_path(model_dir, tmp_path_factory):
    """A 6-neuron circuit of the tiny Llama, discovered once by `cna discover` on POSITIVE vs NEGATIVE."""
    from cna_fast.cli import main

    folder = tmp_path_factory.mktemp("cli-circuit")
    positive, negative = folder / "pos.txt", folder / "neg.txt"
    positive.write_text("\n".join(POSITIVE) + "\n")
    negative.write_text("\n".join(NEGATIVE) + "\n")
    out = folder / "circuit.safetensors"
    assert main([str(arg) for arg in ("discover", "--positive", positive, "--negative", negative, "--model",
                                      model_dir, "--out", out, "--quiet", "--top-k", "6")]) == 0
    return out


@pytest.fixture(scope="session")
def default_model():
    """The embedded default model (SmolLM2-135M-Instruct), loaded once per test session."""
    from cna_fast import load_model

    return load_model()


@pytest.fixture
def private_cache(tmp_path_factory, monkeypatch):
    """Conversions (GGUF files into Hugging Face folders) go to a cache folder of the test's own, never the user's."""
    monkeypatch.setenv("CNA_FAST_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tokenizer):
    """The tiny Llama written as a GGUF file (tests/tiny_gguf.py): its path, and the model of the stored values."""
    from tests.tiny_gguf import write_tiny_llama_gguf

    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_llama_gguf(path, tokenizer)
