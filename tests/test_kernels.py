"""Fused kernels vs their torch references (Triton runs under its CPU interpreter), dispatch, MLP patches.

tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported. The interpreter runs every
program instance in Python, so shapes are small and tiles big; a few cases force small tiles and
several row splits to cover the multi-tile paths. Outputs the kernels allocate are poisoned with NaN
(`poisoned_empty`), so an element a kernel fails to write fails the comparison.
"""
import os
import subprocess
import sys
import types

import pytest
import torch
from transformers.activations import ACT2FN

import cna_fast.kernels.dispatch as dispatch
from cna_fast.kernels import (ACTIVATION_KINDS, BACKEND_ENV, LayerMoments, act_and_capture, act_and_capture_torch,
                              act_and_capture_triton, act_and_scale, act_and_scale_sparse_torch,
                              act_and_scale_sparse_triton, act_and_scale_torch, act_and_scale_triton,
                              activation_kind, apply_activation, backend_for)
from cna_fast.models.fused import patched_capture, patched_scale
from cna_fast.models import get_adapter
from tests.tiny import build_tiny_model

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# h is computed in float32 and rounded once; kernel and reference may differ by one rounding step.
H_TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=2e-3, atol=2e-3),
               torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}
STATS_RTOL = 1e-5


@pytest.fixture
def poisoned_empty(monkeypatch):
    """torch.empty returns NaN-filled float tensors, so unwritten outputs and partials show up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty", empty)


def gate_up(rows: int, width: int, dtype: torch.dtype, offset: float = 0.0, gated: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    gate = (offset + 2 * torch.randn(rows, width, generator=generator)).to(dtype)
    up = torch.randn(rows, width, generator=generator).to(dtype) if gated else None
    return gate, up


def mixed_labels(rows: int, seed: int = 0) -> torch.Tensor:
    """Labels -1, 0, 1 with both sides present whenever rows allow."""
    labels = torch.randint(-1, 2, (rows,), generator=torch.Generator().manual_seed(seed))
    labels[: min(rows, 2)] = torch.tensor([0, 1])[: min(rows, 2)]
    return labels


def moments64(rows: torch.Tensor):
    """(count, mean, M2) of rows [n, width] in float64, two passes."""
    rows = rows.double()
    mean = rows.mean(0) if len(rows) else torch.zeros(rows.shape[1], dtype=torch.float64)
    return len(rows), mean, (rows - mean).square().sum(0)


def prior_stats(width: int, stats_dtype: torch.dtype = torch.float32, offset: float = 0.0, seed: int = 1):
    """Known non-empty running statistics (and the rows behind them) to check the merge against."""
    generator = torch.Generator().manual_seed(seed)
    history = [offset + torch.randn(n, width, generator=generator, dtype=torch.float64) for n in (5, 3)]
    count = torch.tensor([5.0, 3.0], dtype=stats_dtype)
    mean = torch.stack([moments64(rows)[1] for rows in history]).to(stats_dtype)
    m2 = torch.stack([moments64(rows)[2] for rows in history]).to(stats_dtype)
    return history, (count, mean, m2)


def assert_stats(stats, history, h, labels, rtol=STATS_RTOL):
    """Running statistics equal a float64 two-pass over the prior rows plus the labeled rows of h."""
    count, mean, m2 = stats
    for side in (0, 1):
        rows = torch.cat([history[side], h[labels == side].double()])
        n, expected_mean, expected_m2 = moments64(rows)
        assert count[side].item() == n
        # absolute slack: the data's magnitude for means, a typical neuron's M2 (some may be 0) for M2
        torch.testing.assert_close(mean[side].double(), expected_mean, rtol=rtol,
                                   atol=rtol * (rows.abs().max().item() + 1.0))
        torch.testing.assert_close(m2[side].double(), expected_m2, rtol=rtol, atol=rtol * expected_m2.mean().item())


# activations


def test_activation_kind_maps_config_names():
    assert activation_kind("swish") == "silu"
    assert activation_kind("gelu") == "gelu"
    for name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast", "gelu_accurate"):
        assert activation_kind(name) == "gelu_tanh"
    with pytest.raises(ValueError, match="supported: .*gelu_new.*silu"):
        activation_kind("quick_gelu")


@pytest.mark.parametrize("name", ["silu", "swish", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast",
                                  "gelu_accurate", "relu"])
def test_apply_activation_matches_transformers(name):
    x = torch.linspace(-9, 9, 301)
    torch.testing.assert_close(apply_activation(x, activation_kind(name)), ACT2FN[name](x), rtol=1e-5, atol=1e-6)


# act_and_scale


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_act_and_scale_every_kind_and_dtype(kind, dtype, poisoned_empty):
    gate, up = gate_up(17, 1537, dtype)
    scale = torch.rand(1537) * 3 - 1
    for scaling in (scale, None):
        expected = act_and_scale_torch(gate, up, kind, scaling)
        got = act_and_scale_triton(gate, up, kind, scaling, block_cols=512)
        assert got.dtype == dtype
        torch.testing.assert_close(got, expected, **H_TOLERANCE[dtype])


@pytest.mark.parametrize("width", [7, 256, 1537])
@pytest.mark.parametrize("rows", [1, 3, 17])
def test_odd_shapes_all_kernels(rows, width, poisoned_empty):
    gate, up = gate_up(rows, width, torch.float32, seed=rows * width)
    table = torch.rand(3, width) * 2
    table_index = torch.randint(0, 3, (rows,))
    tolerance = H_TOLERANCE[torch.float32]
    torch.testing.assert_close(act_and_scale_triton(gate, up, "silu", table, table_index, block_rows=2, block_cols=128),
                               act_and_scale_torch(gate, up, "silu", table, table_index), **tolerance)

    neurons = torch.tensor([width - 1, 0, width // 2])
    multipliers = torch.tensor([[0.0, 2.0, 1.5], [-1.0, 0.5, 1.0], [3.0, 1.0, 0.0]])
    torch.testing.assert_close(act_and_scale_sparse_triton(gate, None, "gelu", neurons, multipliers, table_index),
                               act_and_scale_sparse_torch(gate, None, "gelu", neurons, multipliers, table_index),
                               **tolerance)

    labels = mixed_labels(rows)
    history, stats = prior_stats(width)
    h = act_and_capture_triton(gate, up, "gelu_tanh", labels, *stats, block_rows=2, block_cols=128, row_splits=2)
    torch.testing.assert_close(h, act_and_scale_torch(gate, up, "gelu_tanh", None), **tolerance)
    assert_stats(stats, history, h, labels)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_per_row_tables_and_sparse(dtype, poisoned_empty):
    gate, up = gate_up(9, 300, dtype, seed=3)
    table_index = torch.tensor([2, 0, 1, 1, 2, 0, 0, 2, 1], dtype=torch.int32)
    table = torch.rand(3, 300).to(dtype)
    torch.testing.assert_close(act_and_scale_triton(gate, up, "gelu", table, table_index, block_cols=128),
                               act_and_scale_torch(gate, up, "gelu", table, table_index), **H_TOLERANCE[dtype])
    neurons = torch.tensor([299, 4, 150, 0, 77])
    for multipliers, index in ((torch.tensor([0.0, 2.0, -1.0, 0.5, 3.0]), None),
                               (torch.randn(3, 5), table_index.long())):
        expected = act_and_scale_sparse_torch(gate, up, "silu", neurons, multipliers, index)
        got = act_and_scale_sparse_triton(gate, up, "silu", neurons, multipliers, index)
        torch.testing.assert_close(got, expected, **H_TOLERANCE[dtype])
    zeroed = act_and_scale_sparse_triton(gate, up, "silu", neurons, torch.zeros(5))
    assert (zeroed[:, neurons] == 0).all()
    untouched = torch.ones(300, dtype=torch.bool)
    untouched[neurons] = False
    torch.testing.assert_close(zeroed[:, untouched], act_and_scale_torch(gate, up, "silu", None)[:, untouched],
                               **H_TOLERANCE[dtype])


def test_scale_argument_errors():
    gate, up = gate_up(4, 8, torch.float32)
    with pytest.raises(ValueError, match="needs table_index"):
        act_and_scale_torch(gate, up, "silu", torch.ones(2, 8))
    with pytest.raises(ValueError, match="needs a scale table"):
        act_and_scale_triton(gate, up, "silu", torch.ones(8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="up must match gate"):
        act_and_scale_torch(gate, up[:, :4], "silu", None)


# act_and_capture


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", ACTIVATION_KINDS)
def test_act_and_capture_every_kind_and_dtype(kind, dtype, poisoned_empty):
    gate, up = gate_up(17, 1537, dtype, seed=7)
    labels = mixed_labels(17, seed=7)
    history, stats = prior_stats(1537)
    history_ref, stats_ref = prior_stats(1537)
    h = act_and_capture_triton(gate, up, kind, labels, *stats, block_cols=1024)
    h_ref = act_and_capture_torch(gate, up, kind, labels, *stats_ref)
    torch.testing.assert_close(h, h_ref, **H_TOLERANCE[dtype])
    assert_stats(stats, history, h, labels)
    assert_stats(stats_ref, history_ref, h_ref, labels)


def test_capture_plain_mlp_skips_unlabeled_rows_even_when_not_finite(poisoned_empty):
    gate, _ = gate_up(12, 64, torch.float32)
    gate[3] = float("inf")
    gate[5] = float("nan")
    labels = torch.tensor([0, 1, 1, -1, 0, -1, 1, 0, 0, -1, 1, 1])
    for capture in (act_and_capture_triton, act_and_capture_torch):
        history, stats = prior_stats(64)
        h = capture(gate, None, "relu", labels, *stats)
        assert_stats(stats, history, h, labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_capture_statistics_with_large_offset(dtype, poisoned_empty):
    """Data around 1e3 with a small spread, many row tiles and splits: float64-exact within 1e-5."""
    spread = 1.0 if dtype == torch.float32 else 16.0  # bfloat16 steps by 4 near 1e3
    empty = [torch.zeros(2), torch.zeros(2, 128), torch.zeros(2, 128)]
    running64 = [torch.zeros(2, dtype=torch.float64), torch.zeros(2, 128, dtype=torch.float64),
                 torch.zeros(2, 128, dtype=torch.float64)]
    seen, seen_labels = [], []
    for batch in range(3):
        generator = torch.Generator().manual_seed(batch)
        gate = (1e3 + spread * torch.randn(300, 128, generator=generator)).to(dtype)
        labels = torch.randint(-1, 2, (300,), generator=generator)
        if batch == 0:  # float32 statistics from empty: one call
            h = act_and_capture_triton(gate, None, "relu", labels, *empty, block_rows=16, row_splits=3)
            assert_stats(empty, [torch.zeros(0, 128, dtype=torch.float64)] * 2, h, labels)
        h = act_and_capture_triton(gate, None, "relu", labels, *running64, block_rows=16, row_splits=3)
        seen.append(h)
        seen_labels.append(labels)
    assert_stats(running64, [torch.zeros(0, 128, dtype=torch.float64)] * 2, torch.cat(seen), torch.cat(seen_labels))


def test_capture_argument_errors():
    gate, up = gate_up(4, 8, torch.float32)
    stats = LayerMoments.zeros(8)
    with pytest.raises(ValueError, match="labels must be"):
        act_and_capture_torch(gate, up, "silu", torch.zeros(4), stats.count, stats.mean, stats.m2)
    with pytest.raises(ValueError, match=r"mean, m2 \[2, 8\]"):
        act_and_capture_triton(gate, up, "silu", torch.zeros(4, dtype=torch.long), stats.count, stats.mean[:, :4],
                               stats.m2)


# dispatch


def test_backend_rules(monkeypatch):
    cpu = torch.zeros(1)
    cuda = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))  # stands in for a CUDA tensor
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    assert backend_for(cpu) == "torch"
    assert backend_for(cuda) == "triton"
    monkeypatch.setenv(BACKEND_ENV, "torch")
    assert backend_for(cuda) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "triton")
    assert backend_for(cpu) == "triton"  # the interpreter is on in tests
    monkeypatch.setattr(dispatch, "INTERPRETER", False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend_for(cpu)
    assert backend_for(cuda) == "triton"
    monkeypatch.setattr(dispatch, "TRITON_AVAILABLE", False)
    with pytest.raises(RuntimeError, match="not installed"):
        backend_for(cuda)
    monkeypatch.delenv(BACKEND_ENV)
    assert backend_for(cuda) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "cuda")
    with pytest.raises(ValueError, match="torch, triton"):
        backend_for(cpu)


def test_public_functions_follow_the_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(dispatch._scale, "act_and_scale_triton", lambda *args: calls.append("triton"))
    monkeypatch.setattr(dispatch._scale, "act_and_scale_torch", lambda *args: calls.append("torch"))
    gate, up = gate_up(2, 8, torch.float32)
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    act_and_scale(gate, up, "silu", None)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    act_and_scale(gate, up, "silu", None)
    assert calls == ["torch", "triton"]
    monkeypatch.setenv(BACKEND_ENV, "torch")
    stats = LayerMoments.zeros(8)
    act_and_capture(gate, up, "silu", torch.tensor([0, 1]), stats.count, stats.mean, stats.m2)
    assert stats.count.tolist() == [1.0, 1.0]


def test_works_without_triton_installed():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, cna_fast, cna_fast.kernels as k\n"
            "assert not k.dispatch.TRITON_AVAILABLE and k.backend_for(torch.zeros(1)) == 'torch'\n"
            "print(k.act_and_scale(torch.ones(2, 3), None, 'relu', torch.full((3,), 2.0)).sum().item())\n")
    environment = {**os.environ, "TRITON_INTERPRET": "0"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "12.0"


SM90_COMPILE = """
import os, sys
os.environ["TRITON_INTERPRET"] = "0"  # compile for real; no GPU is needed to build a cubin
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import cna_fast.kernels
capture, scale = sys.modules["cna_fast.kernels.capture"], sys.modules["cna_fast.kernels.scale"]

def compile_for_sm90(kernel, pointers, constexprs):
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "i32") for name in kernel.arg_names}
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})

pointers = dict(gate_ptr="*bf16", up_ptr="*bf16", h_ptr="*bf16", labels_ptr="*i64", table_index_ptr="*i32",
                scale_ptr="*fp32", neurons_ptr="*i64", multipliers_ptr="*fp32", part_count_ptr="*fp32",
                part_shift_ptr="*fp32", part_mean_ptr="*fp32", part_m2_ptr="*fp32", count_ptr="*fp32")
for kind in ("silu", "gelu", "gelu_tanh", "relu"):
    compile_for_sm90(capture._act_and_capture_kernel, pointers,
                     dict(KIND=kind, HAS_UP=True, BLOCK_ROWS=4, BLOCK_COLS=512))
for stats in ("*fp32", "*fp64"):
    compile_for_sm90(capture._merge_partials_kernel, dict(pointers, mean_ptr=stats, m2_ptr=stats), dict(BLOCK_COLS=512))
compile_for_sm90(scale._act_and_scale_kernel, pointers, dict(KIND="gelu_tanh", HAS_UP=False, HAS_SCALE=True,
                                                              HAS_TABLE=True, BLOCK_ROWS=4, BLOCK_COLS=1024))
compile_for_sm90(scale._scale_columns_kernel, pointers, dict(HAS_TABLE=True, BLOCK_ROWS=64, BLOCK_NEURONS=16))
"""


def test_kernels_compile_for_sm90(tmp_path):
    """The interpreter accepts code the compiler rejects (types of loop-carried values, scalar stores)."""
    environment = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", SM90_COMPILE], capture_output=True, text=True, env=environment,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


# fused MLP patches on tiny models


ARCHS = ["llama", "gpt2", "phi3", "gpt_neox"]


@pytest.fixture(params=["torch", "triton"])
def backend(request, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def tiny(arch, tokenizer):
    model = build_tiny_model(arch, vocab_size=len(tokenizer))
    batch = tokenizer(["the quick brown fox jumps", "bread"], padding=True, return_tensors="pt")
    return model, batch


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def assert_restored(model, reference_logits, batch):
    adapter = get_adapter(model)
    for layer in range(adapter.num_layers):
        assert "forward" not in adapter.mlp(layer).__dict__
    assert torch.equal(logits(model, batch), reference_logits)


def scaled_reference(model, batch, layer_neurons, multipliers, row_table=None):
    """Logits with neurons scaled by a forward pre-hook on the down projection (the method's definition)."""
    adapter = get_adapter(model)

    def hook_for(layer):
        def hook(module, args):
            factors = multipliers[layer] if row_table is None else multipliers[layer][row_table][:, None, :]
            args[0][..., layer_neurons[layer]] *= factors
        return hook

    handles = [adapter.neuron_site(layer).register_forward_pre_hook(hook_for(layer)) for layer in layer_neurons]
    try:
        return logits(model, batch)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_scale_matches_hooked_reference_and_restores(arch, tokenizer, backend):
    model, batch = tiny(arch, tokenizer)
    adapter = get_adapter(model)
    original = logits(model, batch)
    width = adapter.widths[0]
    ones = {layer: torch.ones(width) for layer in range(adapter.num_layers)}
    x = torch.randn(2, 3, model.config.hidden_size)
    with patched_scale(model, ones):
        mlp = adapter.mlp(1)
        torch.testing.assert_close(mlp(x), type(mlp).forward(mlp, x))
        torch.testing.assert_close(logits(model, batch), original)
    assert_restored(model, original, batch)

    neurons = {0: torch.tensor([5, 1, 90]), 2: torch.tensor([0, width - 1])}
    multipliers = {0: torch.tensor([0.0, 2.0, -1.0]), 2: torch.tensor([0.5, 3.0])}
    expected = scaled_reference(model, batch, neurons, multipliers)
    with patched_scale(model, {layer: (neurons[layer], multipliers[layer]) for layer in neurons}):
        torch.testing.assert_close(logits(model, batch), expected)
    dense = {layer: torch.ones(width).index_copy(0, neurons[layer], multipliers[layer]) for layer in neurons}
    with patched_scale(model, dense):
        torch.testing.assert_close(logits(model, batch), expected)
    assert_restored(model, original, batch)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_patched_scale_per_row_tables(arch, tokenizer, backend):
    model, batch = tiny(arch, tokenizer)
    neurons = {1: torch.tensor([3, 40, 7])}
    per_row = {1: torch.tensor([[0.0, 0.0, 0.0], [2.0, -1.0, 0.5]])}
    row_table = torch.tensor([1, 0])
    expected = scaled_reference(model, batch, neurons, per_row, row_table)
    with patched_scale(model, {1: (neurons[1], per_row[1])}, table_index=lambda: row_table):
        torch.testing.assert_close(logits(model, batch), expected)
    with pytest.raises(Exception, match="table_index"):
        with patched_scale(model, {1: (neurons[1], per_row[1])}):
            pass
    assert "forward" not in get_adapter(model).mlp(1).__dict__


@pytest.mark.parametrize("arch", ARCHS)
def test_patched_capture_matches_hooked_reference_and_restores(arch, tokenizer, backend):
    model, batch = tiny(arch, tokenizer)
    adapter = get_adapter(model)
    original = logits(model, batch)
    mask = batch["attention_mask"]
    labels = torch.full(mask.shape, -1)
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)  # last real token whatever the padding side
    labels[torch.arange(2), last] = torch.tensor([1, 0])
    labels[0, 0] = 0  # one more negative row
    layers = [0, 3]
    captured = {}
    handles = [adapter.neuron_site(layer).register_forward_pre_hook(
        lambda module, args, layer=layer: captured.__setitem__(layer, args[0].detach().reshape(-1, args[0].shape[-1])))
        for layer in layers]
    logits(model, batch)
    for handle in handles:
        handle.remove()

    history, prior = prior_stats(adapter.widths[0])
    stats = {layer: LayerMoments(*(tensor.clone() for tensor in prior)) for layer in layers}
    with patched_capture(model, stats, labels=lambda: labels):
        torch.testing.assert_close(logits(model, batch), original)
    assert_restored(model, original, batch)
    for layer in layers:
        moments = stats[layer]
        assert_stats((moments.count, moments.mean, moments.m2), history, captured[layer], labels.reshape(-1),
                     rtol=1e-4)


def test_patches_restore_after_errors_and_refuse_nesting(tokenizer):
    model, batch = tiny("llama", tokenizer)
    original = logits(model, batch)
    stats = {0: LayerMoments.zeros(get_adapter(model).widths[0])}
    with pytest.raises(RuntimeError, match="boom"):
        with patched_capture(model, stats, labels=lambda: torch.zeros(1, dtype=torch.long)):
            raise RuntimeError("boom")
    with patched_capture(model, stats, labels=lambda: torch.zeros(3, dtype=torch.long)):
        with pytest.raises(Exception, match="one label per token"):
            logits(model, batch)
        with pytest.raises(Exception, match="already runs a fused forward"):
            with patched_scale(model, {0: torch.ones(get_adapter(model).widths[0])}):
                pass
    assert_restored(model, original, batch)
