"""4-bit weights kept packed: GGUF Q4_0 / Q4_1 / Q4_K rows decomposed into 4-bit codes with one scale and
offset per 32 weights, then run by torch's int4 matmul (CPU) without ever materialising a float weight.

Every one of these formats is w = q * scale + zero per group of 32 with q in [0, 15]:
  Q4_0: scale = d,       zero = -8 d
  Q4_1: scale = d,       zero = m
  Q4_K: scale = d * sc,  zero = -dmin * mn   (sc, mn: the 6-bit sub-block scale and min)
so the conversion is exact in float32 (torch's kernel computes (q - 8) * scale + (zero + 8 scale))."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from turboinfer.errors import UnsupportedModelError

Q4_0, Q4_1, Q4_K = 2, 3, 12  # GGMLQuantizationType values
GROUP = 32
Q4_TYPES = (Q4_0, Q4_1, Q4_K)


@dataclass
class Q4Weight:
    """A decomposed 4-bit matrix [out_features, in_features]: w = q * scale + zero per group of 32."""

    q: torch.Tensor  # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N, K // 32] float32
    zero: torch.Tensor  # [N, K // 32] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.view(n, k // GROUP, GROUP).float() * self.scale[..., None] + self.zero[..., None]
        return w.view(n, k)

    def permute_rows(self, index: torch.Tensor) -> "Q4Weight":
        return Q4Weight(self.q[index], self.scale[index], self.zero[index])


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    # qs: [..., 16] bytes -> [..., 32] codes: low nibbles are elements 0..15, high nibbles 16..31
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()


def decompose_q4(qtype: int, raw: np.ndarray | torch.Tensor, shape: tuple[int, int]) -> Q4Weight:
    """raw: the tensor's bytes as stored; shape: (out_features, in_features) in HF order."""
    n, k = shape
    data = torch.as_tensor(np.asarray(raw, dtype=np.uint8)).reshape(n, -1)
    if qtype == Q4_0:
        blocks = data.view(n, k // 32, 18)
        d = _f16(blocks[..., :2]).squeeze(-1)
        return Q4Weight(_nibbles(blocks[..., 2:]).reshape(n, k), d, -8 * d)
    if qtype == Q4_1:
        blocks = data.view(n, k // 32, 20)
        d, m = _f16(blocks[..., :2]).squeeze(-1), _f16(blocks[..., 2:4]).squeeze(-1)
        return Q4Weight(_nibbles(blocks[..., 4:]).reshape(n, k), d, m)
    if qtype == Q4_K:
        blocks = data.view(n, k // 256, 144)
        d, dmin = _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4])  # [n, nb, 1]
        s = blocks[..., 4:16].to(torch.int32)
        # 12 bytes hold 8 six-bit scales and 8 six-bit mins (llama.cpp get_scale_min_k4)
        sc = torch.cat([s[..., 0:4] & 63, (s[..., 8:12] & 0x0F) | ((s[..., 0:4] >> 6) << 4)], dim=-1)
        mn = torch.cat([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], dim=-1)
        qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)  # 4 chunks of 64 weights, 32 bytes each
        q = torch.cat([qs & 0x0F, qs >> 4], dim=-1)  # per chunk: low nibbles = sub-block 2j, high = 2j+1
        return Q4Weight(q.reshape(n, k), (d * sc).reshape(n, -1), (-dmin * mn).reshape(n, -1))
    raise UnsupportedModelError(f"GGML type {qtype} is not a 4-bit type this path packs")


class Int4CPUMethod:
    """torch's CPU int4 matmul over the packed codes. Activations run in bfloat16 inside the kernel: that is
    where torch has a vectorised int4 kernel (float32 activations fall back to a ~30x slower loop)."""

    def __init__(self, w: Q4Weight, device: torch.device) -> None:
        n, k = w.shape
        self.out_features = n
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
        # [K // 32, N, 2]: (scale, zero + 8 * scale) per group, as the kernel expects
        self.scales_zeros = torch.stack([w.scale, w.zero + 8 * w.scale], dim=-1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.packed,
                                                       GROUP, self.scales_zeros)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if layer.bias is None else y + layer.bias


def q4_method(w: Q4Weight, device: torch.device):
    if device.type == "cpu":
        return Int4CPUMethod(w, device)
    raise UnsupportedModelError("packed 4-bit weights need the CPU kernel here; load with --dtype and "
                                "--no-keep-quantized on this device")
