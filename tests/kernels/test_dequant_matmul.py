"""int4_matmul / int8_matmul: the Triton kernels against their PyTorch twins, the twins against a dense
dequantized weight, GGUF Q4_0 / Q4_1 weights through the packed layout, and the quantized Linear methods.

Tolerances, against the float32 twin: float32 activations rtol 1e-4 with an absolute floor of 1e-4 x max|y|
(only the summation order differs); bfloat16 rtol 2^-7 (one bf16 step: the twin rounds the output to nearest, the
interpreter truncates) with a floor of 2^-7 x max|y| (on CUDA the dequantized weight tile is rounded to bf16
before the tensor-core product); float16 likewise with 2^-10."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("triton")

from turboinfer.kernels.torch_ref import dequant_matmul as ref  # noqa: E402
from turboinfer.kernels.triton import dequant_matmul as tri  # noqa: E402
from turboinfer.layers.quantization.int8 import (  # noqa: E402
    Int8TorchMethod,
    Int8TritonMethod,
    int8_method,
    quantize_int8,
)
from turboinfer.layers.quantization.q4 import (  # noqa: E402
    Q4_0,
    Q4_1,
    Int4TorchMethod,
    Int4TritonMethod,
    decompose_q4,
    q4_method,
    quantize_q4,
)

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
REL = {F32: 1e-4, BF16: 2.0 ** -7, F16: 2.0 ** -10}


def _assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype
    rel = REL[want.dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=rel, atol=rel * want.float().abs().max().item())


def _int4_case(m, n, k, group_size, dtype, with_bias, device, scale_dtype=F32, seed=0):
    """Random codes, positive scales and signed zeros in the kernel layout, and x [m, k]."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g)
    scale = (torch.rand(k // group_size, n, generator=g) * 0.1 + 0.01).to(scale_dtype)
    zero = (torch.randn(k // group_size, n, generator=g) * 0.5).to(scale_dtype)
    x = torch.randn(m, k, generator=g).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    args = (x, ref.pack_int4(q), scale, zero, group_size, bias)
    return q, tuple(None if t is None else t.to(device) if isinstance(t, torch.Tensor) else t for t in args)


SHAPES = {  # (M, N, K): decode, a few tokens, M and N off the tile sizes, several M tiles
    "decode": (1, 64, 128), "m5": (5, 40, 256), "m17-n72": (17, 72, 128), "m33-n96": (33, 96, 256)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int4_kernel_matches_twin(shape, group_size, dtype, with_bias, device):
    m, n, k = shape
    _, args = _int4_case(m, n, k, group_size, dtype, with_bias, device)
    _assert_close(tri.int4_matmul(*args), ref.int4_matmul(*args))


@pytest.mark.parametrize("scale_dtype", [F16, BF16])
def test_int4_half_scales_and_fp16_activations(scale_dtype, device):
    _, args = _int4_case(9, 48, 256, 64, F16, True, device, scale_dtype=scale_dtype)
    _assert_close(tri.int4_matmul(*args), ref.int4_matmul(*args))


def test_int4_small_tiles(monkeypatch, device):
    # tiles smaller than the problem on every axis: 3 M tiles (the last one partial), 4 N tiles, 8 K steps,
    # 2 K steps per group
    monkeypatch.setattr(tri, "matmul_tiles", lambda m, max_block_k: (16, 16, 32, 4))
    _, args = _int4_case(33, 56, 256, 64, F32, True, device)
    _assert_close(tri.int4_matmul(*args), ref.int4_matmul(*args))


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_int4_twin_matches_dense_weight(group_size):
    q, (x, qweight, scale, zero, _, bias) = _int4_case(7, 24, 512, group_size, F32, True, "cpu")
    assert torch.equal(ref.unpack_int4(qweight), q)
    groups = torch.arange(512) // group_size
    w = q.double() * scale[groups].t().double() + zero[groups].t().double()  # [N, K], gathered independently
    want = x.double() @ w.t() + bias.double()
    got = ref.int4_matmul(x, qweight, scale, zero, group_size, bias)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def _gguf_bytes(qtype: int, n: int, k: int, g: torch.Generator) -> np.ndarray:
    """Random Q4_0 / Q4_1 rows as GGUF stores them: per 32 weights, f16 d (and f16 m), then 16 bytes of codes."""
    num_blocks = n * k // 32
    fields = [(torch.rand(num_blocks, generator=g) * 0.05 + 1e-3).half()]
    if qtype == Q4_1:
        fields.append((torch.randn(num_blocks, generator=g) * 0.1).half())
    fields = [f.view(torch.uint8).view(num_blocks, 2) for f in fields]
    fields.append(torch.randint(0, 256, (num_blocks, 16), dtype=torch.uint8, generator=g))
    return torch.cat(fields, dim=1).numpy()


@pytest.mark.parametrize("qtype", [Q4_0, Q4_1], ids=["q4_0", "q4_1"])
def test_gguf_weight_through_packed_layout(qtype, device):
    g = torch.Generator().manual_seed(qtype)
    n, k = 40, 128
    w = decompose_q4(qtype, _gguf_bytes(qtype, n, k, g), (n, k))
    x = torch.randn(5, k, generator=g)
    want = nn.functional.linear(x, w.dequantize())
    args = (x, ref.pack_int4(w.q), w.scale.t().contiguous(), w.zero.t().contiguous(), w.group_size)
    got = ref.int4_matmul(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    _assert_close(tri.int4_matmul(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args)), got.to(device))


@pytest.mark.parametrize("shape", [(1, 64, 200), (33, 72, 96)], ids=["decode-k200", "m33-n72"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_kernel_matches_twin(shape, dtype, with_bias, device):
    m, n, k = shape  # K = 200 is not a multiple of the K step: the last step is masked
    g = torch.Generator().manual_seed(m)
    qw = quantize_int8(torch.randn(n, k, generator=g))
    x = torch.randn(m, k, generator=g).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device) if with_bias else None
    args = (x, qw.q.to(device), qw.scale.to(device), bias)
    _assert_close(tri.int8_matmul(*args), ref.int8_matmul(*args))
    dense_bias = None if bias is None else bias.cpu().double()
    want = nn.functional.linear(x.cpu().double(), qw.dequantize().double(), dense_bias)
    torch.testing.assert_close(ref.int8_matmul(*args).cpu().double(), want, rtol=REL[dtype],
                               atol=REL[dtype] * want.abs().max().item())


class _Layer(nn.Module):  # what a method's apply() reads from its Linear
    def __init__(self, bias):
        super().__init__()
        self.bias = bias


@pytest.mark.parametrize("awq", [False, True], ids=["rtn", "input_scale"])
def test_int4_triton_method(awq, device):
    g = torch.Generator().manual_seed(3)
    w = quantize_q4(torch.randn(48, 128, generator=g), 32)
    if awq:
        w.input_scale = torch.rand(128, generator=g) + 0.5
    layer = _Layer(torch.randn(48, generator=g).to(device))
    x = torch.randn(2, 3, 128, generator=g).to(device)  # leading dims are flattened and restored
    got = Int4TritonMethod(w, device).apply(layer, x)
    want = Int4TorchMethod(w, device).apply(layer, x)
    assert got.shape == (2, 3, 48)
    # the method keeps scales and zeros in float16: a relative 2^-11 on each, so the float32 floor is wider
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())


def test_int8_triton_method(device):
    g = torch.Generator().manual_seed(4)
    w = quantize_int8(torch.randn(40, 96, generator=g))
    layer = _Layer(torch.randn(40, generator=g).to(device))
    x = torch.randn(2, 3, 96, generator=g).to(device)
    _assert_close(Int8TritonMethod(w, device).apply(layer, x), Int8TorchMethod(w, device).apply(layer, x))


def test_empty_batch(device):
    _, (x, *rest) = _int4_case(1, 32, 64, 32, F32, False, device)
    assert tri.int4_matmul(x[:0], *rest).shape == (0, 32)


def test_rejects_bad_inputs(device):
    _, (x, qweight, scale, zero, group_size, _) = _int4_case(3, 32, 128, 32, F32, False, device)
    with pytest.raises(ValueError, match="x must be"):
        tri.int4_matmul(x.double(), qweight, scale, zero, group_size)
    with pytest.raises(ValueError, match="qweight must be"):
        tri.int4_matmul(x, qweight.to(torch.int8), scale, zero, group_size)
    with pytest.raises(ValueError, match="group_size"):
        tri.int4_matmul(x, qweight, scale, zero, 48)
    with pytest.raises(ValueError, match="scale must be"):
        tri.int4_matmul(x, qweight, scale.t(), zero, group_size)
    with pytest.raises(ValueError, match="bias must be"):
        tri.int4_matmul(x, qweight, scale, zero, group_size, torch.zeros(31, device=device))
    with pytest.raises(ValueError, match="qweight must be"):
        tri.int8_matmul(x, torch.zeros(32, 64, dtype=torch.int8, device=device), torch.ones(32, device=device))
    with pytest.raises(ValueError, match="q must be"):
        ref.pack_int4(torch.zeros(4, 5, dtype=torch.uint8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("m", [1, 7, 2048])
@pytest.mark.parametrize("n, k, group_size", [(4096, 4096, 128), (1000, 14336, 32)])
def test_gpu_real_sizes(m, n, k, group_size):
    cuda = torch.device("cuda")
    _, args = _int4_case(m, n, k, group_size, BF16, True, cuda, scale_dtype=F16)
    _assert_close(tri.int4_matmul(*args), ref.int4_matmul(*args))
    qw = quantize_int8(torch.randn(n, k))
    x, bias = args[0], args[-1]
    i8 = (x, qw.q.to(cuda), qw.scale.to(cuda), bias)
    _assert_close(tri.int8_matmul(*i8), ref.int8_matmul(*i8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_methods_are_chosen():
    cuda = torch.device("cuda")
    w = quantize_q4(torch.randn(256, 512), 128)
    w.input_scale = torch.rand(512) + 0.5
    method = q4_method(w, cuda)
    assert isinstance(method, Int4TritonMethod)
    assert isinstance(int8_method(quantize_int8(torch.randn(64, 512)), cuda), Int8TritonMethod)
    layer = _Layer(torch.randn(256, device=cuda, dtype=BF16))
    x = torch.randn(3, 512, device=cuda, dtype=BF16)
    _assert_close(method.apply(layer, x), Int4TorchMethod(w, cuda).apply(layer, x))


def _grouped_case(qtype: int, n: int, k: int, seed: int):
    from gguf_writer import random_blocks

    from turboinfer.layers.quantization.grouped_int8 import decompose_grouped_int8

    return decompose_grouped_int8(qtype, random_blocks(qtype, n, k, seed), (n, k))


@pytest.mark.parametrize("qtype", [8, 13, 14], ids=["q8_0", "q5_k", "q6_k"])
@pytest.mark.parametrize("m", [1, 33])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_grouped_int8_kernel_matches_twin(qtype, m, dtype, device):
    """GGUF Q8_0 / Q5_K (zeros) / Q6_K (groups of 16) as int8 codes: kernel vs twin vs the dense weight."""
    n, k = 72, 512  # N not a multiple of the N tile
    w = _grouped_case(qtype, n, k, m)
    g = torch.Generator().manual_seed(m)
    x = (torch.randn(m, k, generator=g) * 0.1).to(dtype).to(device)
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    zero = None if w.zero is None else w.zero.t().contiguous().to(device)
    args = (x, w.q.to(device), w.scale.t().contiguous().to(device), zero, w.group_size, bias)
    _assert_close(tri.grouped_int8_matmul(*args), ref.grouped_int8_matmul(*args))
    want = nn.functional.linear(x.cpu().double(), w.dequantize().double(), bias.cpu().double())
    torch.testing.assert_close(ref.grouped_int8_matmul(*args).cpu().double(), want, rtol=REL[dtype],
                               atol=REL[dtype] * want.abs().max().item())


def test_grouped_int8_triton_method(device):
    from turboinfer.layers.quantization.grouped_int8 import (
        GroupedInt8TorchMethod,
        GroupedInt8TritonMethod,
    )

    w = _grouped_case(13, 40, 256, 9)
    layer = _Layer(None)
    x = torch.randn(2, 3, 256, generator=torch.Generator().manual_seed(9)).to(device) * 0.1
    got = GroupedInt8TritonMethod(w, device).apply(layer, x)
    assert got.shape == (2, 3, 40)
    _assert_close(got, GroupedInt8TorchMethod(w, device).apply(layer, x))
    with pytest.raises(ValueError, match="group_size"):
        tri.grouped_int8_matmul(x[0].contiguous(), w.q.to(device), w.scale.t().contiguous().to(device), None, 24)
