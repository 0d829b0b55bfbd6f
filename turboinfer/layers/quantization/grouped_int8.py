"""GGUF's 5-, 6- and 8-bit weights kept as int8 codes with a scale (and offset) per small group of input features:
w = q * scale + zero, q int8. Each type converts without loss (the float32 arithmetic is the dequantizer's own):
  Q8_0: group 32, scale = d,         no zero,            q the stored int8
  Q5_0: group 32, scale = d,         no zero,            q the 5-bit code - 16
  Q5_1: group 32, scale = d,         zero = m,           q the 5-bit code
  Q6_K: group 16, scale = d * sc,    no zero,            q the 6-bit code - 32 (sc: the int8 sub-block scale)
  Q5_K: group 32, scale = d * sc,    zero = -dmin * mn,  q the 5-bit code (sc, mn: 6-bit sub-block scale and min)
The codes take one byte a weight (Q6_K and Q5_K pack 6 and 5 bits in the file, so they grow by 1.3x and 1.4x; a
float32 copy would be 4.9x and 5.8x), plus a float32 scale per group. A merged layer whose shards mix these with
4-bit ones (llama.cpp's Q4_K_M files keep some attn_v in Q6_K beside Q4_K q and k) keeps each run of shards in its
own format (layers/quantization SplitWeight).

The matmul: on CPU the C kernel (`kernels/cpu/decode.c`, x quantized to int16 per row, int16 multiply-adds per
group) for a few rows, and for more rows (prefill) the float weight is rebuilt a block of output rows at a time and
multiplied densely; on CUDA the Triton dequant-matmul; elsewhere the PyTorch twin (the dense path)."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from turboinfer.errors import UnsupportedModelError
from turboinfer.loader.gguf_dequant import (Q5_0, Q5_1, Q5_K, Q6_K, Q8_0, QK_K, _f16, _k_low_nibbles, _k_scales,
                                            q5_codes)

GROUPED_INT8_TYPES = (Q8_0, Q5_0, Q5_1, Q5_K, Q6_K)
C_KERNEL_MAX_ROWS = 16  # up to this many rows of x the C kernel runs; beyond, dequantize-and-matmul is faster
DEQUANT_BLOCK = 1 << 22  # weights rebuilt in float at a time by the dense path (16 MiB in float32)


@dataclass
class GroupedInt8Weight:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor | None  # [N, K // group_size] float32, or None for symmetric types
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, rows: slice = slice(None)) -> torch.Tensor:
        """The float32 weight (rows `rows` of it), exactly as the GGUF dequantizer computes it."""
        q = self.q[rows]
        n, k = q.shape
        g = self.group_size
        w = q.view(n, k // g, g).float() * self.scale[rows, :, None]
        if self.zero is not None:
            w = w + self.zero[rows, :, None]
        return w.view(n, k)

    def rows(self, start: int, size: int) -> "GroupedInt8Weight":
        sl = slice(start, start + size)
        return replace(self, q=self.q[sl], scale=self.scale[sl], zero=None if self.zero is None else self.zero[sl])

    def regroup(self, group_size: int) -> "GroupedInt8Weight":
        """The same weight described with a smaller group (a divisor of this one): scales repeat, nothing rounds."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"group {self.group_size} cannot be split into groups of {group_size}")
        r = self.group_size // group_size
        return replace(self, scale=self.scale.repeat_interleave(r, dim=1),
                       zero=None if self.zero is None else self.zero.repeat_interleave(r, dim=1), group_size=group_size)

    @staticmethod
    def cat(parts: list["GroupedInt8Weight"]) -> "GroupedInt8Weight":
        """Stack row blocks (the shards of a merged layer), on their finest common group."""
        g = math.gcd(*(p.group_size for p in parts))
        parts = [p.regroup(g) for p in parts]
        zero = None
        if any(p.zero is not None for p in parts):
            zero = torch.cat([p.zero if p.zero is not None else torch.zeros_like(p.scale) for p in parts])
        return GroupedInt8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]), zero, g)


def decompose_grouped_int8(qtype: int, raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> GroupedInt8Weight:
    """raw: the tensor's bytes as stored; shape: (out_features, in_features) in HF order."""
    n, k = shape
    data = torch.as_tensor(np.asarray(raw, dtype=np.uint8)).reshape(n, -1)
    if qtype == Q8_0:
        blocks = data.view(n, k // 32, 34)
        return GroupedInt8Weight(blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k),
                                 _f16(blocks[..., :2]).squeeze(-1), None, 32)
    if qtype in (Q5_0, Q5_1):
        off = 6 if qtype == Q5_0 else 8
        blocks = data.view(n * (k // 32), off + 16)
        codes = q5_codes(blocks[:, off - 4:off], blocks[:, off:]).to(torch.int8)
        d = _f16(blocks[:, :2]).reshape(n, k // 32)
        if qtype == Q5_0:
            return GroupedInt8Weight((codes - 16).reshape(n, k), d, None, 32)
        return GroupedInt8Weight(codes.reshape(n, k), d, _f16(blocks[:, 2:4]).reshape(n, k // 32), 32)
    if qtype == Q6_K:
        blocks = data.view(n * (k // QK_K), 210)
        d = _f16(blocks[:, 208:210])  # [nb, 1]
        sc = blocks[:, 192:208].contiguous().view(torch.int8).float()  # [nb, 16]
        ql = blocks[:, :128].reshape(-1, 2, 1, 64)
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
        high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> shifts) & 0x03
        q = ((low | (high << 4)).to(torch.int16) - 32).to(torch.int8)
        return GroupedInt8Weight(q.reshape(n, k), (d * sc).reshape(n, k // 16), None, 16)
    if qtype == Q5_K:
        blocks = data.view(n * (k // QK_K), 176)
        d, dmin = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
        sc, mn = _k_scales(blocks[:, 4:16])
        shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
        qh = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 0x01
        q = (_k_low_nibbles(blocks[:, 48:]) | (qh << 4)).view(torch.int8)
        return GroupedInt8Weight(q.reshape(n, k), (d * sc.float()).reshape(n, k // 32),
                                 -(dmin * mn.float()).reshape(n, k // 32), 32)
    raise UnsupportedModelError(f"GGML type {qtype} is not a type this path keeps as int8")


def _dense(w: GroupedInt8Weight, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T with W rebuilt in x's dtype a block of output rows at a time (never the whole float matrix)."""
    n, k = w.shape
    step = max(1, DEQUANT_BLOCK // k)
    if step >= n:
        return F.linear(x, w.dequantize().to(x.dtype), bias)
    out = x.new_empty(*x.shape[:-1], n)
    for r in range(0, n, step):
        sl = slice(r, min(n, r + step))
        out[..., sl] = F.linear(x, w.dequantize(sl).to(x.dtype), None if bias is None else bias[sl])
    return out


class GroupedInt8TorchMethod:
    """The PyTorch twin (any device, and the reference): the weight rebuilt in blocks, then dense matmuls."""

    def __init__(self, w: GroupedInt8Weight, device: torch.device) -> None:
        self.w = GroupedInt8Weight(w.q.to(device).contiguous(), w.scale.to(device).float().contiguous(),
                                   None if w.zero is None else w.zero.to(device).float().contiguous(), w.group_size)
        self.out_features = w.shape[0]
        self.group_size = w.group_size

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return _dense(self.w, x, layer.bias)


class GroupedInt8CPUMethod(GroupedInt8TorchMethod):
    """CPU: the C kernel for up to C_KERNEL_MAX_ROWS rows of x (decode), the twin's dense path beyond (prefill)."""

    def __init__(self, w: GroupedInt8Weight, device: torch.device, lib) -> None:
        super().__init__(w, device)
        self.lib = lib

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        m = math.prod(shape[:-1])
        if m == 0 or m > C_KERNEL_MAX_ROWS:
            return _dense(self.w, x, layer.bias)
        from turboinfer.kernels.cpu import grouped_int8_matmul

        y = grouped_int8_matmul(self.lib, x.reshape(m, shape[-1]), self.w, torch.get_num_threads())
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if layer.bias is None else y + layer.bias


class GroupedInt8TritonMethod:
    """CUDA: the Triton dequant-matmul (`kernels/triton/dequant_matmul.py`, int8 codes): one byte per weight and the
    float32 group scales are read, no float weight is written."""

    def __init__(self, w: GroupedInt8Weight, device: torch.device) -> None:
        from turboinfer.kernels.triton.dequant_matmul import grouped_int8_matmul

        self.matmul = grouped_int8_matmul  # imported here, not at the top: the CPU path must not need triton
        self.out_features = w.shape[0]
        self.group_size = w.group_size
        self.q = w.q.to(device).contiguous()
        self.scale = w.scale.t().to(device, torch.float32).contiguous()  # [K // g, N]
        self.zero = None if w.zero is None else w.zero.t().to(device, torch.float32).contiguous()

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).contiguous(), self.q, self.scale, self.zero, self.group_size,
                        layer.bias)
        return y.view(*shape[:-1], self.out_features)


def grouped_int8_method(w: GroupedInt8Weight, device: torch.device):
    if device.type == "cpu" and w.group_size in (16, 32) and w.shape[1] % 32 == 0:
        from turboinfer.kernels import cpu as cpu_kernels

        lib = cpu_kernels.load_library() if cpu_kernels.enabled() else None
        if lib is not None:
            return GroupedInt8CPUMethod(w, device, lib)
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None and \
            w.group_size >= 16 and not w.group_size & (w.group_size - 1):
        return GroupedInt8TritonMethod(w, device)
    return GroupedInt8TorchMethod(w, device)
