"""8-bit weights, symmetric per output channel: w[n, :] = q[n, :] * scale[n] with q int8 in [-127, 127] and
scale = max|w[n, :]| / 127, so every element is off by at most scale / 2 and the weight costs one byte."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Int8Weight:
    q: torch.Tensor  # [N, K] int8
    scale: torch.Tensor  # [N] float32

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        return self.q.float() * self.scale[:, None]

    def rows(self, start: int, size: int) -> "Int8Weight":
        return Int8Weight(self.q[start:start + size], self.scale[start:start + size])

    @staticmethod
    def cat(parts: list["Int8Weight"]) -> "Int8Weight":
        return Int8Weight(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]))


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)  # an all-zero row: codes 0
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return Int8Weight(q, scale)


class Int8CPUMethod:
    """torch's CPU int8 weight-only matmul. Activations go through the kernel in bfloat16: its float32 path is
    ~20-60x slower (measured on AVX-512 for 1 and 64 rows), so a float32 model pays one rounding of x instead."""

    def __init__(self, w: Int8Weight, device: torch.device) -> None:
        self.q = w.q.contiguous()
        self.scale = w.scale.to(torch.bfloat16)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, shape[-1]).to(torch.bfloat16), self.q, self.scale)
        y = y.to(x.dtype).view(*shape[:-1], self.q.shape[0])
        return y if layer.bias is None else y + layer.bias


class Int8TorchMethod:
    """The plain-PyTorch twin (other devices, and the test oracle): dequantize in the activation dtype, then a
    dense matmul."""

    def __init__(self, w: Int8Weight, device: torch.device) -> None:
        self.q = w.q.to(device)
        self.scale = w.scale.to(device)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.q.to(x.dtype) * self.scale.to(x.dtype)[:, None], layer.bias)


class Int8TritonMethod:
    """CUDA: the Triton int8 matmul (`kernels/triton/dequant_matmul.py`), which reads the int8 codes and applies
    the row scale to the float32 accumulator, never writing a float weight."""

    def __init__(self, w: Int8Weight, device: torch.device) -> None:
        from turboinfer.kernels.triton.dequant_matmul import int8_matmul

        self.matmul = int8_matmul  # imported here, not at the top: the CPU path must not need triton
        self.q = w.q.to(device).contiguous()  # [N, K] int8
        self.scale = w.scale.to(device, torch.float32)  # [N]

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = self.matmul(x.reshape(-1, shape[-1]).contiguous(), self.q, self.scale, layer.bias)
        return y.view(*shape[:-1], self.q.shape[0])


def int8_method(w: Int8Weight, device: torch.device):
    if device.type == "cpu":
        return Int8CPUMethod(w, device)
    if device.type == "cuda" and importlib.util.find_spec("triton") is not None:
        return Int8TritonMethod(w, device)
    return Int8TorchMethod(w, device)
