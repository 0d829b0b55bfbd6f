"""Weight-only quantized matmuls, y = x @ W^T, that read the packed weight and dequantize it tile by tile in
registers: W is never written out in float, so a decode step reads 0.5 byte per int4 weight (1 per int8) plus
its scales, instead of dequantizing the whole matrix every call and then reading it again as a dense weight.

Layouts (the int4 one is defined, with `pack_int4`, in `kernels/torch_ref/dequant_matmul.py`):
  int4: qweight [N, K // 2] uint8, byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4; scale, zero [K // g, N]
  int8: qweight [N, K] int8; scale [N] (symmetric, per output channel)
  grouped int8: qweight [N, K] int8; scale [K // g, N] and optional zero [K // g, N] (GGUF Q8_0 / Q5_K / Q6_K)

A program owns a BLOCK_N x BLOCK_M tile of y^T and walks K in BLOCK_K steps: it loads BLOCK_N rows of packed
codes, splits the nibbles and interleaves them back into K order (tl.interleave), applies the tile's scale and
zero, and multiplies the [BLOCK_N, BLOCK_K] weight tile by the [BLOCK_K, BLOCK_M] tile of x^T. The weight is
tl.dot's left operand ("swap AB"), so a decode batch of one token pads the short, cheap side of the MMA (M to 16)
rather than the weight side. BLOCK_K divides the group size, so a K step has one scale and zero per row.

Accumulation is float32. On CUDA, 16-bit activations meet the dequantized weight rounded to their dtype on the
tensor cores; float32 uses exact ("ieee") products. Under TRITON_INTERPRET=1 (CPU tensors) every tile is widened
to float32 first, as in the attention kernels (`common.dot_config`). No split-K: at M = 1 a 4096-row weight gives
4096 / BLOCK_N programs. The tile sizes are untuned starting points; the kernel has not been timed on a GPU yet.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turboinfer.kernels.torch_ref.dequant_matmul import pack_int4  # noqa: F401  (the layout's one definition)
from turboinfer.kernels.triton.common import FLOAT_DTYPES, dot_config, next_pow2


def matmul_tiles(m: int, max_block_k: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps) for M rows of x. Decode (M <= 16) takes narrow N tiles so that even
    a 4096-row weight spreads over 128 programs, and long K steps to keep many weight bytes in flight; prefill
    takes square-ish 128-wide tiles so each weight tile is reused by many rows. BLOCK_K <= max_block_k."""
    block_m = min(max(16, next_pow2(m)), 128)
    if m <= 16:
        block_n, block_k = 32, 128
    elif m <= 64:
        block_n, block_k = 64, 64
    else:
        block_n, block_k = 128, 64
    block_k = min(block_k, max_block_k)
    return block_m, block_n, block_k, 4 if block_m * block_n <= 64 * 64 else 8


@triton.jit
def _store_tile(acc, B, Y, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS: tl.constexpr):
    # acc: [BLOCK_N, BLOCK_M] float32 tile of y^T
    if HAS_BIAS:
        acc += tl.load(B + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    y_ptrs = Y + offs_m[None, :].to(tl.int64) * stride_ym + offs_n[:, None]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _group_matmul_kernel(
    X, QW, S, Z, B, Y, M, N, K,
    stride_xm, stride_qn, stride_sg, stride_ym,
    GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, INT8: tl.constexpr,
    HAS_ZERO: tl.constexpr,
):
    # INT8: one int8 code per byte; else two 4-bit codes per byte (pack_int4). Without HAS_ZERO, Z is not read.
    pid_n = tl.program_id(0)  # N fastest: neighbouring programs share the x tile, which then stays in L2
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]  # [BLOCK_K, BLOCK_M]: x^T
    if INT8:
        q_ptrs = QW + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]
    else:
        q_ptrs = QW + offs_n[:, None].to(tl.int64) * stride_qn + tl.arange(0, BLOCK_K // 2)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0 and BLOCK_K divides GROUP_SIZE: no K masks
        if INT8:
            codes = tl.load(q_ptrs, mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K] int8
        else:
            packed = tl.load(q_ptrs, mask=n_mask[:, None], other=0)  # [BLOCK_N, BLOCK_K // 2] uint8
            codes = tl.interleave(packed & 0xF, packed >> 4)  # [BLOCK_N, BLOCK_K] in K order
        group = k0 // GROUP_SIZE
        scale = tl.load(S + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = codes.to(tl.float32) * scale[:, None]
        if HAS_ZERO:
            w += tl.load(Z + group * stride_sg + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        xt = tl.load(x_ptrs, mask=m_mask[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        acc = tl.dot(w.to(xt.dtype), xt, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K if INT8 else BLOCK_K // 2
    _store_tile(acc, B, Y, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)


@triton.jit
def _int8_matmul_kernel(
    X, QW, S, B, Y, M, N, K,
    stride_xm, stride_qn, stride_ym,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + offs_m[None, :].to(tl.int64) * stride_xm + offs_k[:, None]
    q_ptrs = QW + offs_n[:, None].to(tl.int64) * stride_qn + offs_k[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = offs_k < K - k0
        codes = tl.load(q_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)  # [BLOCK_N, BLOCK_K] int8
        xt = tl.load(x_ptrs, mask=m_mask[None, :] & k_mask[:, None], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
        # codes in [-127, 127] are exact in every float dtype; the row scale is applied once, after the loop
        acc = tl.dot(codes.to(xt.dtype), xt, acc, input_precision=DOT_PREC)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    acc *= tl.load(S + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    _store_tile(acc, B, Y, offs_n, offs_m, n_mask, m_mask, stride_ym, HAS_BIAS)


def _check_x_bias(x: torch.Tensor, n: int, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.dtype not in FLOAT_DTYPES or x.stride(1) != 1:
        raise ValueError(f"x must be a [M, K] float16/bfloat16/float32 tensor with contiguous rows, got {x.dtype} "
                         f"{tuple(x.shape)} strides {x.stride()}")
    if bias is not None and (bias.shape != (n,) or bias.dtype not in FLOAT_DTYPES or bias.stride(0) != 1
                             or bias.device != x.device):
        raise ValueError(f"bias must be a contiguous float [{n}] tensor on {x.device}, got {bias.dtype} "
                         f"{tuple(bias.shape)} on {bias.device}")


def _check_int8_weight(qweight: torch.Tensor, k: int) -> None:
    if qweight.dim() != 2 or qweight.dtype != torch.int8 or qweight.shape[1] != k or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be a [N, {k}] int8 tensor with contiguous rows, got {qweight.dtype} "
                         f"{tuple(qweight.shape)} strides {qweight.stride()}")


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), W[n, k] = q[n, k] * scale[k // g, n] + zero[k // g, n]: x [M, K] float, qweight
    [N, K // 2] uint8 (`pack_int4`), scale and zero [K // g, N] float; returns [M, N] in x's dtype."""
    n = qweight.shape[0]
    _check_x_bias(x, n, bias)
    m, k = x.shape
    if qweight.dim() != 2 or qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != k or qweight.stride(1) != 1:
        raise ValueError(f"qweight must be a [N, {k // 2}] uint8 tensor with contiguous rows (two codes per byte), "
                         f"got {qweight.dtype} {tuple(qweight.shape)} strides {qweight.stride()}")
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"group_size must be a power of two >= 16 dividing K = {k}, got {group_size}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t.shape != (k // group_size, n) or t.dtype not in FLOAT_DTYPES or t.stride(1) != 1:
            raise ValueError(f"{name} must be a float [{k // group_size}, {n}] tensor contiguous along N, got "
                             f"{t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if scale.stride() != zero.stride():
        raise ValueError(f"scale and zero need equal strides, got {scale.stride()} and {zero.stride()}")
    for name, t in (("qweight", qweight), ("scale", scale), ("zero", zero)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device}")
    return _launch_grouped(x, qweight, scale, zero, group_size, bias, int8=False)


def grouped_int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), W[n, k] = q[n, k] * scale[k // g, n] (+ zero[k // g, n]): x [M, K] float, qweight
    [N, K] int8, scale and zero [K // g, N] float, g a power of two >= 16; returns [M, N] in x's dtype."""
    n = qweight.shape[0]
    _check_x_bias(x, n, bias)
    m, k = x.shape
    _check_int8_weight(qweight, k)
    if group_size < 16 or group_size & (group_size - 1) or k % group_size:
        raise ValueError(f"group_size must be a power of two >= 16 dividing K = {k}, got {group_size}")
    for name, t in (("scale", scale), ("zero", zero)):
        if t is not None and (t.shape != (k // group_size, n) or t.dtype not in FLOAT_DTYPES or t.stride(1) != 1
                              or t.stride() != scale.stride() or t.device != x.device):
            raise ValueError(f"{name} must be a float [{k // group_size}, {n}] tensor contiguous along N on "
                             f"{x.device}, got {t.dtype} {tuple(t.shape)} strides {t.stride()}")
    if qweight.device != x.device:
        raise ValueError(f"qweight is on {qweight.device}, expected {x.device}")
    return _launch_grouped(x, qweight, scale, zero, group_size, bias, int8=True)


def _launch_grouped(x, qweight, scale, zero, group_size: int, bias, int8: bool) -> torch.Tensor:
    """The group-wise kernel over int4 (two codes a byte) or int8 codes; the arguments are checked by the caller."""
    m, n, k = x.shape[0], qweight.shape[0], x.shape[1]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k, num_warps = matmul_tiles(m, group_size)
    upcast, dot_prec = dot_config(x.dtype, x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _group_matmul_kernel[grid](
        x, qweight, scale, scale if zero is None else zero, y if bias is None else bias, y, m, n, k,
        x.stride(0), qweight.stride(0), scale.stride(0), y.stride(0),
        GROUP_SIZE=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, UPCAST=upcast, DOT_PREC=dot_prec, INT8=int8, HAS_ZERO=zero is not None,
        num_warps=num_warps, num_stages=3,
    )
    return y


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias), W[n, k] = qweight[n, k] * scale[n]: x [M, K] float, qweight [N, K] int8, scale [N]
    float; returns [M, N] in x's dtype."""
    n = qweight.shape[0]
    _check_x_bias(x, n, bias)
    m, k = x.shape
    _check_int8_weight(qweight, k)
    if scale.shape != (n,) or scale.dtype not in FLOAT_DTYPES or scale.stride(0) != 1:
        raise ValueError(f"scale must be a contiguous float [{n}] tensor, got {scale.dtype} {tuple(scale.shape)}")
    for name, t in (("qweight", qweight), ("scale", scale)):
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, expected {x.device}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    block_m, block_n, block_k, num_warps = matmul_tiles(m, 128)
    upcast, dot_prec = dot_config(x.dtype, x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _int8_matmul_kernel[grid](
        x, qweight, scale, y if bias is None else bias, y, m, n, k,
        x.stride(0), qweight.stride(0), y.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        HAS_BIAS=bias is not None, UPCAST=upcast, DOT_PREC=dot_prec, num_warps=num_warps, num_stages=3,
    )
    return y
