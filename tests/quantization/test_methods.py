"""Quantized matmul methods against their plain-PyTorch twins, and the rounding bounds of the quantizers.

torch's CPU int4/int8 kernels take bfloat16 activations and scales and return bfloat16, so they are compared
with the dequantized oracle fed the same bfloat16-rounded activations, to rtol 2^-7 (two bf16 ulps) with an
absolute floor of 2^-7 x max|y|."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from turboinfer.layers.quantization import merge_shards, quant_method_for
from turboinfer.layers.quantization.awq import InputStats, quantize_awq
from turboinfer.layers.quantization.checkpoint import from_tensors, to_tensors
from turboinfer.layers.quantization.int8 import Int8CPUMethod, Int8TorchMethod, quantize_int8
from turboinfer.layers.quantization.q4 import Int4CPUMethod, Int4TorchMethod, q4_method, quantize_q4
from turboinfer.layers.quantization.transform import layer_group_size

CPU = torch.device("cpu")
BF16_TOL = 2.0 ** -7


class _Layer(nn.Module):  # what a method's apply() reads from its Linear
    def __init__(self, bias):
        super().__init__()
        self.bias = bias


def _assert_bf16_close(y: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(y.float(), ref.float(), rtol=BF16_TOL, atol=BF16_TOL * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_kernel_matches_oracle(dtype, with_bias):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 160, generator=g)
    x = torch.randn(2, 5, 160, generator=g).to(dtype)  # leading dims are flattened and restored
    layer = _Layer(torch.randn(96, generator=g).to(dtype) if with_bias else None)
    qw = quantize_int8(w)
    y = Int8CPUMethod(qw, CPU).apply(layer, x)
    assert y.dtype == dtype and y.shape == (2, 5, 96)
    float_layer = _Layer(None if layer.bias is None else layer.bias.float())
    oracle = Int8TorchMethod(qw, CPU)
    _assert_bf16_close(y, oracle.apply(float_layer, x.to(torch.bfloat16).float()))
    # the twin is exactly dequantize-then-linear
    torch.testing.assert_close(oracle.apply(float_layer, x.float()),
                               nn.functional.linear(x.float(), qw.dequantize(), float_layer.bias))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
@pytest.mark.parametrize("awq", [False, True], ids=["rtn", "input_scale"])
def test_int4_kernel_matches_oracle(group_size, awq):
    g = torch.Generator().manual_seed(group_size)
    w = torch.randn(48, 512, generator=g)
    x = torch.randn(7, 512, generator=g)
    qw = quantize_q4(w, group_size)
    if awq:
        qw.input_scale = torch.rand(512, generator=g) + 0.5
    layer = _Layer(torch.randn(48, generator=g))
    method = q4_method(qw, CPU)
    assert isinstance(method, Int4CPUMethod)
    y = method.apply(layer, x)
    xs = x if qw.input_scale is None else x * qw.input_scale  # the kernel sees the scaled x in bf16
    x_bf16 = (xs.to(torch.bfloat16).float() / (1 if qw.input_scale is None else qw.input_scale))
    _assert_bf16_close(y, Int4TorchMethod(qw, CPU).apply(layer, x_bf16))


def test_int4_falls_back_to_torch_where_the_kernel_cannot_run():
    w = torch.randn(24, 64)  # out_features not a multiple of 16
    assert isinstance(q4_method(quantize_q4(w, 32), CPU), Int4TorchMethod)
    assert isinstance(q4_method(quantize_q4(torch.randn(32, 64), 32), torch.device("meta")), Int4TorchMethod)
    assert isinstance(quant_method_for(quantize_int8(torch.randn(32, 64)), torch.device("meta")), Int8TorchMethod)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_round_to_nearest_error_is_at_most_half_a_step(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 512, generator=g) * torch.rand(64, 1, generator=g) * 3
    w[0, :group_size] = 0.25  # a constant group is exact
    qw = quantize_q4(w, group_size)
    assert qw.q.dtype == torch.uint8 and int(qw.q.max()) <= 15
    assert qw.scale.shape == (64, 512 // group_size)
    err = (qw.dequantize() - w).abs().view(64, -1, group_size)
    bound = qw.scale[..., None] / 2
    assert bool((err <= bound * (1 + 1e-5) + 1e-7).all())
    assert float(err[0, 0].max()) == 0.0
    # both ends of every group are hit exactly: the grid spans [min, max]
    grid = qw.dequantize().view(64, -1, group_size)
    torch.testing.assert_close(grid.amin(-1), w.view(64, -1, group_size).amin(-1))
    torch.testing.assert_close(grid.amax(-1), w.view(64, -1, group_size).amax(-1))


def test_int8_round_to_nearest_error_is_at_most_half_a_step():
    w = torch.randn(32, 100) * torch.linspace(0.01, 5, 32)[:, None]
    w[3] = 0
    qw = quantize_int8(w)
    assert qw.q.dtype == torch.int8 and int(qw.q.abs().max()) <= 127
    err = (qw.dequantize() - w).abs()
    assert bool((err <= qw.scale[:, None] / 2 * (1 + 1e-5)).all())
    assert bool((qw.dequantize()[3] == 0).all())


def test_awq_search_never_loses_to_round_to_nearest_and_wins_on_outlier_channels():
    g = torch.Generator().manual_seed(2)
    w = torch.randn(64, 256, generator=g)
    x = torch.randn(96, 256, generator=g)
    x[:, :4] *= 30  # a few input channels much larger than the rest, as in real LLM activations
    stats = InputStats(x.abs().mean(0), x)
    rtn = quantize_q4(w, 64)
    awq = quantize_awq(w, stats, 64)
    err_rtn = (x @ rtn.dequantize().t() - x @ w.t()).norm()
    err_awq = (x @ awq.dequantize().t() - x @ w.t()).norm()
    assert awq.input_scale is not None and awq.input_scale.shape == (256,)
    assert err_awq < 0.9 * err_rtn


@pytest.mark.parametrize("kind", ["int8", "int4", "int4-awq"])
def test_checkpoint_tensors_round_trip(kind):
    w = torch.randn(32, 128)
    qw = quantize_int8(w) if kind == "int8" else quantize_q4(w, 64)
    if kind == "int4-awq":
        qw.input_scale = torch.rand(128) + 0.5
    parts = to_tensors("model.layers.0.mlp.down_proj", qw)
    if kind != "int8":
        assert parts["model.layers.0.mlp.down_proj.qweight"].shape == (32, 64)  # two codes a byte
    back = from_tensors({k.rsplit(".", 1)[1]: v for k, v in parts.items()}, 8 if kind == "int8" else 4)
    assert torch.equal(back.dequantize(), qw.dequantize())


def test_merged_shards_and_group_size_choice():
    a, b = quantize_q4(torch.randn(32, 64), 32), quantize_q4(torch.randn(16, 64), 32)
    assert torch.equal(merge_shards([a, b]).dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    with pytest.raises(ValueError):
        merge_shards([a, quantize_int8(torch.randn(16, 64))])
    with pytest.raises(ValueError):
        merge_shards([a, quantize_q4(torch.randn(16, 64), 64)])
    assert isinstance(quant_method_for(quantize_int8(torch.randn(16, 64)), CPU), Int8CPUMethod)
    assert layer_group_size(576, 128) == 64 and layer_group_size(4096, 128) == 128
    assert layer_group_size(96, 256) == 32 and layer_group_size(100, 128) is None


@pytest.mark.parametrize("portable", [False, True], ids=["vectorised", "portable"])
def test_int4_to_bf16_is_exact(portable):
    """The C conversion of torch's packed int4 to bf16 W^T: each weight (q - 8) s + z8 from the bf16 (s, z8) pair,
    rounded to nearest even, for every row block (and a sub-range of them)."""
    from turboinfer.kernels import cpu as cpu_kernels

    lib = cpu_kernels.load_library(("-mno-avx512f",) if portable else ())
    if lib is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(5)
    w = quantize_q4(torch.randn(192, 256, generator=g) * 0.05, 64)
    m = Int4CPUMethod(w, CPU)
    sz = m.scales_zeros.float()  # [K / g, N, 2]
    want = ((w.q.float() - 8) * sz[..., 0].t().repeat_interleave(64, 1)
            + sz[..., 1].t().repeat_interleave(64, 1)).to(torch.bfloat16).t()
    got = cpu_kernels.int4_to_bf16_t(lib, m.packed, m.scales_zeros, 192, 256, 64, 0, 192, 2)
    assert got.shape == (256, 192) and torch.equal(got, want)
    part = cpu_kernels.int4_to_bf16_t(lib, m.packed, m.scales_zeros, 192, 256, 64, 64, 192, 1)
    assert torch.equal(part, want[:, 64:])


def test_int4_prefill_in_bf16_uses_dense_weights(monkeypatch):
    """bf16 inputs of DENSE_MIN_ROWS rows or more: bf16 weights in blocks and a dense matmul, which agrees with the
    int4 kernel and the float oracle to bf16 tolerance; fewer rows keep the int4 kernel."""
    from turboinfer.layers.quantization import q4

    g = torch.Generator().manual_seed(6)
    w = quantize_q4(torch.randn(320, 128, generator=g) * 0.05, 32)
    m = Int4CPUMethod(w, CPU)
    if m.lib is None:
        pytest.skip("no C compiler")
    layer = _Layer(torch.randn(320, generator=g).to(torch.bfloat16))
    monkeypatch.setattr(q4, "DENSE_BLOCK", 128 * 128)  # two blocks of 128 rows and one of 64
    calls = []
    real = m._dense_bf16
    monkeypatch.setattr(m, "_dense_bf16", lambda x: calls.append(x.shape[0]) or real(x))
    for rows in (8, 48):
        x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
        y = m.apply(layer, x)
        ref = x.float() @ w.dequantize().t() + layer.bias.float()
        _assert_bf16_close(y, ref.to(torch.bfloat16))
    assert calls == [48]


def test_awq_clip_search_never_worse_per_group():
    """search_clip keeps, per (row, group), the clamp range with the smallest output error on the sample; r = 1 (no
    clamp) is among the candidates, so no group's error grows, and heavy-tailed weights (where a min-max grid is
    stretched by a few large values) gain overall."""
    from turboinfer.layers.quantization.awq import search_clip

    g = torch.Generator().manual_seed(8)
    w = torch.randn(48, 128, generator=g).pow(3) * 0.05
    x = torch.randn(64, 128, generator=g)

    def group_err(weights: torch.Tensor) -> torch.Tensor:
        d = (quantize_q4(weights, 32).dequantize() - w).view(48, 4, 32)
        return torch.einsum("ngk,sgk->sng", d, x.view(64, 4, 32)).pow(2).mean(0)

    clipped = search_clip(w, x, 32)
    assert (clipped.abs() <= w.abs() + 1e-7).all()  # only ever clamps
    assert (group_err(clipped) <= group_err(w) * (1 + 1e-5)).all()
    assert group_err(clipped).sum() < 0.9 * group_err(w).sum()
