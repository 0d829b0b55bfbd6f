"""GGML block formats -> float32 tensors, in vectorised torch (no Python loop over blocks).

A quantized GGUF tensor is a run of fixed-size blocks along each row. Every block holds `elements_per_block`
weights as small integers plus one or more fp16 scales; K-quants ("super-blocks" of 256) add 6-bit
sub-block scales/mins. The layouts follow ggml's `ggml-common.h` (block_q4_0, block_q4_K, ...), and the
arithmetic is done in the same order as `gguf.quants` so results are bit-identical to it.

Shapes: `shape` is in numpy / torch order, outermost first. For a weight that is `[out_features,
in_features]`, the same as HF's `nn.Linear.weight`. The GGUF header (and `gguf.ReaderTensor.shape`) lists
dimensions the other way round (ggml's `ne`, innermost first); callers reverse it before calling here.
Blocks always run along the last (innermost, contiguous) dimension.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from turboinfer.errors import ModelLoadError, UnsupportedModelError

# ggml type ids (enum ggml_type); the numbers are part of the file format.
F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K, BF16 = 0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30

TYPE_NAMES = {F32: "F32", F16: "F16", Q4_0: "Q4_0", Q4_1: "Q4_1", Q5_0: "Q5_0", Q5_1: "Q5_1", Q8_0: "Q8_0",
              Q4_K: "Q4_K", Q5_K: "Q5_K", Q6_K: "Q6_K", BF16: "BF16"}

QK_K = 256  # weights per K-quant super-block

# qtype -> (elements_per_block, bytes_per_block)
BLOCK_SIZES: dict[int, tuple[int, int]] = {
    F32: (1, 4),
    F16: (1, 2),
    BF16: (1, 2),
    Q8_0: (32, 2 + 32),  # d:f16, qs:int8[32]
    Q4_0: (32, 2 + 16),  # d:f16, qs:4-bit[32]
    Q4_1: (32, 2 + 2 + 16),  # d:f16, m:f16, qs:4-bit[32]
    Q5_0: (32, 2 + 4 + 16),  # d:f16, qh:32 fifth bits, qs:4-bit[32]
    Q5_1: (32, 2 + 2 + 4 + 16),  # d:f16, m:f16, qh, qs
    Q4_K: (QK_K, 2 + 2 + 12 + QK_K // 2),  # d, dmin, 8x(6-bit scale, 6-bit min), qs:4-bit[256]
    Q5_K: (QK_K, 2 + 2 + 12 + QK_K // 8 + QK_K // 2),  # as Q4_K plus qh: the 5th bit of each weight
    Q6_K: (QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + 2),  # ql:4-bit, qh:2-bit, scales:int8[16], d:f16
}


def type_name(qtype: int) -> str:
    """A readable name for a ggml type id, also for ids this module cannot dequantize."""
    if qtype in TYPE_NAMES:
        return TYPE_NAMES[qtype]
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(qtype).name
    except (ImportError, ValueError):
        return f"type {qtype}"


def _as_uint8(raw: np.ndarray | torch.Tensor) -> torch.Tensor:
    if isinstance(raw, torch.Tensor):
        return raw.reshape(-1).view(torch.uint8)
    arr = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    # GGUFReader hands out read-only memmaps; torch warns about that, but nothing here writes into `raw`:
    # every result below is a fresh tensor (F32 is cloned for exactly this reason).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[n_blocks, 2] uint8 -> [n_blocks, 1] float32 (little-endian fp16, as ggml stores it)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., k] uint8 -> [..., 2k]: the k low nibbles, then the k high nibbles (ggml's 4-bit order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = b[:, 2:].contiguous().view(torch.int8).float()  # [n, 32]
    return q * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b[:, :2])
    q = _nibbles(b[:, 2:]).float() - 8.0  # [n, 32], symmetric around 0
    return d * q


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b[:, :2]), _f16(b[:, 2:4])
    q = _nibbles(b[:, 4:]).float()  # [n, 32], offset by the block minimum m
    return d * q + m


def q5_codes(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 codes in [0, 31]: qh [n, 4] (bit j: the 5th bit of weight j), qs [n, 16] -> [n, 32] uint8."""
    bits = qh.contiguous().view(torch.int32)  # little-endian uint32; bit 31 lands in the sign, & 1 clears it
    high = ((bits >> torch.arange(32, dtype=torch.int32)) & 1).to(torch.uint8)  # [n, 32]
    return _nibbles(qs) | (high << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * (q5_codes(b[:, 2:6], b[:, 6:]).float() - 16.0)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    return _f16(b[:, :2]) * q5_codes(b[:, 4:8], b[:, 8:]).float() + _f16(b[:, 2:4])


def _k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K/Q5_K `get_scale_min_k4`), each [n, 8].

    bytes 0-3: scale j (low 6 bits) | 2 high bits of scale j+4
    bytes 4-7: min j (low 6 bits)   | 2 high bits of min j+4
    bytes 8-11: low 4 bits of scale j+4 | low 4 bits of min j+4 << 4
    """
    s = s.reshape(-1, 3, 4)
    lo_sc, lo_mn, rest = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([lo_sc & 0x3F, (rest & 0x0F) | ((lo_sc >> 2) & 0x30)], dim=-1)
    mn = torch.cat([lo_mn & 0x3F, (rest >> 4) | ((lo_mn >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_low_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, 128] -> [n, 8, 32]: each 32-byte chunk gives one sub-block from its low nibbles, then one from
    its high nibbles."""
    qs = qs.reshape(-1, 4, 1, 32)
    return torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(-1, 8, 32)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)  # [n, 8, 1]
    offset = (dmin * mn.float()).unsqueeze(-1)
    q = _k_low_nibbles(b[:, 16:]).float()  # [n, 8, 32]
    return (scale * q - offset).reshape(-1, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _k_scales(b[:, 4:16])
    scale = (d * sc.float()).unsqueeze(-1)
    offset = (dmin * mn.float()).unsqueeze(-1)
    ql = _k_low_nibbles(b[:, 48:])  # [n, 8, 32]
    # qh[l] bit j is the 5th bit of weight l of sub-block j.
    shifts = torch.arange(8, dtype=torch.uint8).view(1, 8, 1)
    qh = (b[:, 16:48].reshape(-1, 1, 32) >> shifts) & 0x01  # [n, 8, 32]
    q = (ql | (qh << 4)).float()
    return (scale * q - offset).reshape(-1, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    ql, qh = b[:, :128], b[:, 128:192]
    scales = b[:, 192:208].contiguous().view(torch.int8).float()  # [n, 16], one per 16 weights
    d = _f16(b[:, 208:210])
    scale = (d * scales).unsqueeze(-1)  # [n, 16, 1]
    # Each half of the super-block (128 weights) uses 64 bytes of ql and 32 of qh: weights 0-31 take the low
    # nibbles of ql[0:32] and qh bits 0-1, 32-63 low nibbles of ql[32:64] and bits 2-3, 64-95 the high
    # nibbles of ql[0:32] and bits 4-5, 96-127 the high nibbles of ql[32:64] and bits 6-7.
    ql = ql.reshape(-1, 2, 1, 64)
    low = torch.cat([ql & 0x0F, ql >> 4], dim=2).reshape(-1, 2, 4, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    high = (qh.reshape(-1, 2, 1, 32) >> shifts) & 0x03  # [n, 2, 4, 32]
    q = (low | (high << 4)).float() - 32.0  # signed 6-bit
    return (scale * q.reshape(-1, 16, 16)).reshape(-1, QK_K)


_BLOCK_DECODERS = {Q8_0: _q8_0, Q4_0: _q4_0, Q4_1: _q4_1, Q5_0: _q5_0, Q5_1: _q5_1, Q4_K: _q4_k, Q5_K: _q5_k,
                   Q6_K: _q6_k}


def dequantize(raw: np.ndarray | torch.Tensor, qtype: int, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode the bytes of one GGUF tensor into a new float32 tensor of `shape` (numpy order, see top).

    `raw` is the tensor's data exactly as stored in the file (any array whose bytes are those, e.g.
    `gguf.ReaderTensor.data`); it is never written to."""
    qtype = int(qtype)
    if qtype not in BLOCK_SIZES:
        supported = ", ".join(TYPE_NAMES[t] for t in BLOCK_SIZES)
        raise UnsupportedModelError(f"GGUF tensor type {type_name(qtype)} is not supported (supported: {supported})")
    elems, nbytes = BLOCK_SIZES[qtype]
    shape = tuple(int(s) for s in shape)
    numel = math.prod(shape)
    if shape and shape[-1] % elems:
        raise ModelLoadError(f"{type_name(qtype)} tensor rows of {shape[-1]} are not a multiple of its block "
                             f"size {elems}")
    data = _as_uint8(raw)
    expected = numel // elems * nbytes
    if data.numel() != expected:
        raise ModelLoadError(f"{type_name(qtype)} tensor of shape {list(shape)} needs {expected} bytes, "
                             f"got {data.numel()}")
    if qtype == F32:
        out = data.view(torch.float32).clone()
    elif qtype == F16:
        out = data.view(torch.float16).float()
    elif qtype == BF16:
        out = data.view(torch.bfloat16).float()  # bf16 -> f32 is an exact 16-bit shift
    else:
        out = _BLOCK_DECODERS[qtype](data.view(-1, nbytes))
    return out.reshape(shape)
