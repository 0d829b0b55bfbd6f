"""4-bit weights kept packed: w = q * scale + zero per group of `group_size` input features, q in [0, 15], run by
torch's int4 matmul (CPU) or a Triton dequant-matmul (CUDA) without ever materialising a float weight.

Two sources produce them. GGUF Q4_0 / Q4_1 / Q4_K rows decompose exactly (group of 32):
  Q4_0: scale = d,       zero = -8 d
  Q4_1: scale = d,       zero = m
  Q4_K: scale = d * sc,  zero = -dmin * mn   (sc, mn: the 6-bit sub-block scale and min)
and float checkpoints are rounded to nearest per group (`quantize_q4`, group of 32/64/128/256).
torch's kernel computes (q - 8) * scale + (zero + 8 scale), so the stored pair is rewritten once at load."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from turboinfer.errors import UnsupportedModelError

Q4_0, Q4_1, Q4_K = 2, 3, 12  # GGMLQuantizationType values
GROUP = 32  # GGUF's group size
Q4_TYPES = (Q4_0, Q4_1, Q4_K)
KERNEL_GROUP_SIZES = (32, 64, 128, 256)  # what torch's int4pack kernel accepts (and the Triton one runs)


@dataclass
class Q4Weight:
    """A decomposed 4-bit matrix [out_features, in_features]: w = q * scale + zero per group of input features.
    With `input_scale` (AWQ) the layer computes (x * input_scale) w^T, i.e. its effective weight is
    w * input_scale[None, :]."""

    q: torch.Tensor  # [N, K] uint8 in [0, 15]
    scale: torch.Tensor  # [N, K // group_size] float32
    zero: torch.Tensor  # [N, K // group_size] float32
    group_size: int = GROUP
    input_scale: torch.Tensor | None = None  # [K] float32, shared by every row (and every shard of a merged layer)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight the layer applies to x (input_scale folded in)."""
        n, k = self.q.shape
        g = self.group_size
        w = (self.q.view(n, k // g, g).float() * self.scale[..., None] + self.zero[..., None]).view(n, k)
        return w if self.input_scale is None else w * self.input_scale

    def permute_rows(self, index: torch.Tensor) -> "Q4Weight":
        return replace(self, q=self.q[index], scale=self.scale[index], zero=self.zero[index])

    def rows(self, start: int, size: int) -> "Q4Weight":
        return replace(self, q=self.q[start:start + size], scale=self.scale[start:start + size],
                       zero=self.zero[start:start + size])

    @staticmethod
    def cat(parts: list["Q4Weight"]) -> "Q4Weight":
        """Stack row blocks (the shards of a merged layer); they must share group size and input scale."""
        first = parts[0]
        for p in parts[1:]:
            if p.group_size != first.group_size:
                raise ValueError("shards of one layer have different group sizes")
            if (p.input_scale is None) != (first.input_scale is None) or \
                    (p.input_scale is not None and not torch.equal(p.input_scale, first.input_scale)):
                raise ValueError("shards of one layer have different input scales")
        return replace(first, q=torch.cat([p.q for p in parts]), scale=torch.cat([p.scale for p in parts]),
                       zero=torch.cat([p.zero for p in parts]))


def quantize_q4(w: torch.Tensor, group_size: int) -> Q4Weight:
    """Asymmetric round-to-nearest: each group's [min, max] is cut into 15 equal steps (16 levels), so every
    element is off by at most scale / 2."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)
    scale, lo = q4_grid(groups)  # [N, K // g]
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Q4Weight(q.reshape(n, k), scale, lo, group_size)


def q4_grid(groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero) of the asymmetric 16-level grid over each group's [min, max], along the last dimension. A
    constant group gets scale 1e-12: codes 0, zero = its value, exact."""
    lo, hi = groups.aminmax(dim=-1)
    return ((hi - lo) / 15).clamp(min=1e-12), lo


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


DENSE_MIN_ROWS = 32  # bf16 inputs of at least this many rows go through bf16 weights and a dense matmul
DENSE_BLOCK = 1 << 22  # weights converted to bf16 at a time (8 MiB)


class Int4CPUMethod:
    """torch's CPU int4 matmul over the packed codes. Activations run in bfloat16 inside the kernel: that is
    where torch has a vectorised int4 kernel (float32 activations fall back to a ~30x slower loop).

    Prefill in bfloat16 (at least DENSE_MIN_ROWS rows) goes another way when the C kernels are built: blocks of
    the weight are converted to bf16 (`kernels/cpu` ti_int4_to_bf16, transposed, 8 MiB at a time) and multiplied by
    torch's dense bf16 matmul, which on CPUs with bf16 dot products is about 2x the int4 kernel, conversion included
    (a 512 x 576 x 3072 layer: 4.0 ms against 8.2 ms). The weights are then rounded to bf16 (relative 2^-9), as a
    bf16 model's are; float32 compute keeps the int4 kernel."""

    def __init__(self, w: Q4Weight, device: torch.device) -> None:
        n, k = w.shape
        self.out_features = n
        self.group_size = w.group_size
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(w.q.to(torch.int32), 1)
        # [K // group_size, N, 2]: (scale, zero + 8 * scale) per group, as the kernel expects
        self.scales_zeros = torch.stack([w.scale, w.zero + 8 * w.scale], dim=-1).transpose(0, 1) \
            .contiguous().to(torch.bfloat16)
        self.input_scale = w.input_scale  # [K] float32 or None
        self.in_features = k
        self.lib = None
        if n % 64 == 0:
            from turboinfer.kernels import cpu as cpu_kernels

            self.lib = cpu_kernels.load_library() if cpu_kernels.enabled() else None

    def _dense_bf16(self, x2: torch.Tensor) -> torch.Tensor:
        from turboinfer.kernels.cpu import int4_to_bf16_t

        n, k = self.out_features, self.in_features
        step = max(64, DENSE_BLOCK // k // 64 * 64)
        threads = torch.get_num_threads()
        if step >= n:
            return x2 @ int4_to_bf16_t(self.lib, self.packed, self.scales_zeros, n, k, self.group_size, 0, n, threads)
        y = x2.new_empty(x2.shape[0], n)
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            wt = int4_to_bf16_t(self.lib, self.packed, self.scales_zeros, n, k, self.group_size, n0, n1, threads)
            torch.matmul(x2, wt, out=y[:, n0:n1])
        return y

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            x2 = x2 * self.input_scale
        if x2.dtype == torch.bfloat16 and x2.shape[0] >= DENSE_MIN_ROWS and self.lib is not None:
            y = self._dense_bf16(x2)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), self.packed, self.group_size,
                                                           self.scales_zeros)
        y = y.to(x.dtype).view(*shape[:-1], self.out_features)
        return y if layer.bias is None else y + layer.bias


class Int4TorchMethod:
    """The plain-PyTorch twin: dequantize to the activation dtype on every call, then a dense matmul. Runs on any
    device and any shape (the CPU kernel needs out_features % 16 == 0); memory stays at one byte per weight."""

    def __init__(self, w: Q4Weight, device: torch.device) -> None:
        self.w = Q4Weight(w.q.to(device), w.scale.to(device), w.zero.to(device), w.group_size,
                          None if w.input_scale is None else w.input_scale.to(device))

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w.dequantize().to(x.dtype), layer.bias)


class Int4TritonMethod:
    """CUDA: the Triton dequant-matmul (`kernels/triton/dequant_matmul.py`) over codes packed two to a byte, so a
    call reads 0.5 byte per weight plus the scales and never writes a float weight. Scales and zeros are stored
    float16 (GGUF's own precision for Q4_0 / Q4_1; a relative 2^-11 elsewhere), float32 if they would overflow."""

    def __init__(self, w: Q4Weight, device: torch.device) -> None:
        from turboinfer.kernels.triton.dequant_matmul import int4_matmul, pack_int4

        self.matmul = int4_matmul  # imported here, not at the top: the CPU path must not need triton
        n, _ = w.shape
        self.out_features = n
        self.group_size = w.group_size
        self.qweight = pack_int4(w.q).to(device)  # [N, K // 2] uint8
        fits = max(w.scale.abs().max().item(), w.zero.abs().max().item()) < torch.finfo(torch.float16).max
        dtype = torch.float16 if fits else torch.float32
        self.scale = w.scale.t().to(device, dtype).contiguous()  # [K // group_size, N]
        self.zero = w.zero.t().to(device, dtype).contiguous()
        self.input_scale = None if w.input_scale is None else w.input_scale.to(device)  # [K] float32

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_scale is not None:
            x2 = (x2 * self.input_scale).to(x.dtype)
        y = self.matmul(x2.contiguous(), self.qweight, self.scale, self.zero, self.group_size, layer.bias)
        return y.view(*shape[:-1], self.out_features)


def q4_method(w: Q4Weight, device: torch.device):
    if device.type == "cpu" and w.shape[0] % 16 == 0 and w.group_size in KERNEL_GROUP_SIZES:
        return Int4CPUMethod(w, device)
    if device.type == "cuda" and w.group_size in KERNEL_GROUP_SIZES and importlib.util.find_spec("triton"):
        return Int4TritonMethod(w, device)
    return Int4TorchMethod(w, device)
