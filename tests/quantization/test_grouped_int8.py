"""GGUF Q8_0 / Q5_0 / Q5_1 / Q5_K / Q6_K kept as int8 codes: exact against the gguf package's dequantization, mixed with 4-bit
shards in one merged layer, and the C kernel against the float matmul.

Tolerances: the decomposition is exact (torch.equal). The C kernel quantizes each row of x to int16 (error at most
max|x| / 65534 per element, so at most max|x| sum_k |W_nk| / 65534 on an output) and sums in float32 (relative
error ~1e-6 of sum_k |x_k W_nk|): the bound asserted is 2e-5 max|x| sum_k |W_nk| + 1e-5 sum_k |x_k W_nk|."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants as ref
from gguf_writer import random_blocks

from turboinfer.kernels import cpu as cpu_kernels
from turboinfer.layers.quantization import merge_shards, quant_method_for
from turboinfer.layers.quantization.grouped_int8 import (
    GroupedInt8CPUMethod,
    GroupedInt8TorchMethod,
    GroupedInt8Weight,
    decompose_grouped_int8,
)
from turboinfer.layers.quantization.q4 import decompose_q4


def reference(raw: np.ndarray, qtype, shape) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ref.dequantize(raw, qtype), dtype=np.float32)).reshape(shape)


@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_decomposition_is_exact(qtype):
    n, k = 24, 512
    raw = random_blocks(qtype, n, k, int(qtype))
    w = decompose_grouped_int8(int(qtype), raw, (n, k))
    assert w.q.dtype == torch.int8 and w.q.shape == (n, k)
    assert w.group_size == (16 if qtype == T.Q6_K else 32)
    assert (w.zero is not None) == (qtype in (T.Q5_K, T.Q5_1))
    assert torch.equal(w.dequantize(), reference(raw, qtype, (n, k)))
    # rows, regrouping and the row-block dequantization keep it exact
    assert torch.equal(w.rows(5, 7).dequantize(), reference(raw, qtype, (n, k))[5:12])
    if w.group_size == 32:
        assert torch.equal(w.regroup(16).dequantize(), w.dequantize())
    assert torch.equal(w.dequantize(slice(3, 9)), w.dequantize()[3:9])


def test_quantized_floats_round_trip():
    x = (np.random.default_rng(0).standard_normal((16, 256)) * 0.1).astype(np.float32)
    raw = ref.quantize(x, T.Q8_0)
    w = decompose_grouped_int8(int(T.Q8_0), raw, x.shape)
    assert torch.equal(w.dequantize(), reference(raw, T.Q8_0, x.shape))


def test_mixed_shards_keep_their_formats():
    """q and k in Q4_K, v in Q6_K (as llama.cpp's Q4_K_M files store some layers): one layer of two parts, each in
    its own format, whose matmul equals the dense one."""
    from turboinfer.layers.quantization import PartsMethod, SplitWeight
    from turboinfer.layers.quantization.q4 import Q4Weight

    k = 256
    parts = [(T.Q4_K, 64), (T.Q4_K, 32), (T.Q6_K, 32)]
    raws = [random_blocks(qt, n, k, i) for i, (qt, n) in enumerate(parts)]
    shards = [decompose_q4(int(qt), raw, (n, k)) if qt == T.Q4_K else decompose_grouped_int8(int(qt), raw, (n, k))
              for (qt, n), raw in zip(parts, raws)]
    merged = merge_shards(shards)
    assert isinstance(merged, SplitWeight) and merged.shape == (128, k)
    assert isinstance(merged.parts[0], Q4Weight) and merged.parts[0].shape == (96, k)
    assert isinstance(merged.parts[1], GroupedInt8Weight) and merged.parts[1].group_size == 16
    expect = torch.cat([reference(raw, qt, (n, k)) for (qt, n), raw in zip(parts, raws)])
    assert torch.equal(torch.cat([merged.parts[0].dequantize(), merged.parts[1].dequantize()]), expect)
    method = quant_method_for(merged, torch.device("cpu"))
    assert isinstance(method, PartsMethod) and method.rows == [96, 32]

    class Layer:
        bias = torch.randn(128)

    x = torch.randn(3, k)
    want = x @ expect.t() + Layer.bias
    got = method.apply(Layer, x)
    assert got.shape == (3, 128)
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=2 ** -7 * want.abs().max().item())  # bf16 int4 kernel
    # Q8_0 beside Q5_K: both int8, one part, group 32, zeros only where Q5_K has them
    a = decompose_grouped_int8(int(T.Q8_0), random_blocks(T.Q8_0, 16, k, 7), (16, k))
    b = decompose_grouped_int8(int(T.Q5_K), random_blocks(T.Q5_K, 16, k, 8), (16, k))
    m = merge_shards([a, b])
    assert m.group_size == 32 and torch.equal(m.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def _bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    x, w = x.abs().double(), w.abs().double()
    return 2e-5 * x.amax(1, keepdim=True) * w.sum(1) + 1e-5 * x @ w.t()


needs_c = pytest.mark.skipif(cpu_kernels.load_library() is None, reason="no C compiler for the CPU kernels")


@needs_c
@pytest.mark.parametrize("portable", [False, True], ids=["vectorised", "portable"])
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q5_K, T.Q6_K], ids=lambda t: t.name)
def test_c_kernel_matches_float_matmul(qtype, portable):
    lib = cpu_kernels.load_library(("-mno-avx512f",) if portable else ())
    n, k = 72, 768  # 72 rows: four blocks of 16 and a tail of 8
    raw = random_blocks(qtype, n, k, 3)
    w = decompose_grouped_int8(int(qtype), raw, (n, k))
    dense = w.dequantize().double()
    g = torch.Generator().manual_seed(0)
    for m in (1, 3, 4, 7):
        x = torch.randn(m, k, generator=g) * torch.logspace(-2, 1, k)  # rows with a wide range of magnitudes
        y = cpu_kernels.grouped_int8_matmul(lib, x, w, 2)
        err = (y.double() - x.double() @ dense.t()).abs()
        assert (err <= _bound(x, dense)).all(), err.max()


@needs_c
def test_cpu_method_switches_to_dense_for_long_inputs():
    n, k = 48, 512
    w = decompose_grouped_int8(int(T.Q6_K), random_blocks(T.Q6_K, n, k, 4), (n, k))
    method = quant_method_for(w, torch.device("cpu"))
    assert isinstance(method, GroupedInt8CPUMethod)

    class Layer:
        bias = torch.randn(n)

    for m in (2, 40):  # C kernel, then the dense path
        x = torch.randn(m, k)
        want = x @ w.dequantize().t() + Layer.bias
        got = method.apply(Layer, x)
        assert got.shape == (m, n)
        assert ((got - want).abs() <= _bound(x, w.dequantize()).float() + 1e-6).all()


def test_torch_twin_in_blocks_equals_one_matmul(monkeypatch):
    from turboinfer.layers.quantization import grouped_int8

    n, k = 40, 256
    w = decompose_grouped_int8(int(T.Q5_K), random_blocks(T.Q5_K, n, k, 5), (n, k))
    x = torch.randn(6, k)

    class Layer:
        bias = None

    method = GroupedInt8TorchMethod(w, torch.device("cpu"))
    whole = method.apply(Layer, x)
    monkeypatch.setattr(grouped_int8, "DEQUANT_BLOCK", 7 * k)  # 7 rows at a time, a short last block
    # the same products; BLAS may block the sums differently for another output width (float32 rounding)
    atol = 1e-5 * whole.abs().max().item()
    torch.testing.assert_close(method.apply(Layer, x), whole, rtol=1e-5, atol=atol)
    torch.testing.assert_close(whole, x @ w.dequantize().t(), rtol=1e-5, atol=atol)
