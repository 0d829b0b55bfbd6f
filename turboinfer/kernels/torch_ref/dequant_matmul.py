"""Weight-only quantized matmuls in plain PyTorch: the twins of `kernels/triton/dequant_matmul.py` (same
signatures), used as their test oracle. They unpack, dequantize to float32, multiply in float32 and cast back.

The packed int4 layout (shared with the kernel, which is why `pack_int4` lives here, free of triton):
  qweight  [N, K // 2] uint8   byte j of row n = q[n, 2j] | q[n, 2j + 1] << 4 (low nibble: the even column)
  scale    [K // g, N]         w[n, k] = q[n, k] * scale[k // g, n] + zero[k // g, n], q in [0, 15]
  zero     [K // g, N]         float16 / bfloat16 / float32; K-major so a tile's N scales are one contiguous row
Row n keeps its codes in one contiguous run of K / 2 bytes, so row blocks (shards) still cut along dim 0."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 codes in [0, 15] -> [N, K // 2] uint8, two codes per byte (even column in the low nibble)."""
    if q.dim() != 2 or q.dtype != torch.uint8 or q.shape[1] % 2:
        raise ValueError(f"q must be a [N, K] uint8 tensor with K even, got {q.dtype} {tuple(q.shape)}")
    return (q[:, 0::2] & 0x0F) | (q[:, 1::2] << 4)


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """[N, K // 2] packed bytes -> [N, K] uint8 codes; the inverse of `pack_int4`."""
    return torch.stack([qweight & 0x0F, qweight >> 4], dim=-1).reshape(qweight.shape[0], -1)


def dequantize_int4(qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] the packed tensors stand for."""
    q = unpack_int4(qweight).float()
    scale = scale.float().t().repeat_interleave(group_size, dim=1)  # [N, K]
    zero = zero.float().t().repeat_interleave(group_size, dim=1)
    return q * scale + zero


def int4_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias): x [M, K] -> [M, N] in x's dtype, W as in the module docstring."""
    w = dequantize_int4(qweight, scale, zero, group_size)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W[n, k] = qweight[n, k] * scale[n]: qweight [N, K] int8, scale [N]."""
    w = qweight.float() * scale.float()[:, None]
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)


def grouped_int8_matmul(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                        group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W^T (+ bias) with W[n, k] = qweight[n, k] * scale[k // g, n] (+ zero[k // g, n]): qweight [N, K]
    int8, scale and zero [K // g, N] (zero optional)."""
    w = qweight.float() * scale.float().t().repeat_interleave(group_size, dim=1)
    if zero is not None:
        w = w + zero.float().t().repeat_interleave(group_size, dim=1)
    return F.linear(x.float(), w, None if bias is None else bias.float()).to(x.dtype)
