"""What the Triton attention kernels share: the dtype tiles are multiplied in, launch-time checks of the paged
cache, and round-half-to-even on the device (the int8 quantizer must round exactly like `torch.round`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turboinfer.kernels.torch_ref.attention import QMAX

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def head_dim_block(head_dim: int) -> int:
    # tl.arange needs a power of two and tl.dot at least 16: 80 and 96 run as 128 with the tail masked
    return max(16, next_pow2(head_dim))


def dot_config(dtype: torch.dtype, device: torch.device) -> tuple[bool, str]:
    """(UPCAST: widen the Q/K/V tiles to float32 before tl.dot, tl.dot input precision).

    On CUDA 16-bit tiles go to the tensor cores as they are; float32 uses exact ("ieee") products rather than
    TF32 so it matches the PyTorch twin. CPU tensors only run under TRITON_INTERPRET=1, whose emulator keeps
    bfloat16 as raw 16-bit integers and gets arithmetic on it wrong, so there every tile is widened to float32.
    Quantized codes (int8, e4m3) convert exactly to the query's dtype: their per-token scales are applied to the
    float32 scores and probabilities instead of to the tiles.
    """
    if device.type == "cpu":
        return True, "ieee"
    return False, "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is tl.dot's default, moot for 16-bit


def check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor, k_scale: torch.Tensor | None,
                v_scale: torch.Tensor | None, device: torch.device) -> bool:
    """Validate a layer's paged cache; returns whether it is quantized (int8 / fp8 codes plus scales)."""
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_blocks, block_size, num_kv_heads, head_dim], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError(f"k_cache is {k_cache.dtype} but v_cache is {v_cache.dtype}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError(f"k_cache/v_cache need equal strides with a contiguous head_dim, got {k_cache.stride()} "
                         f"and {v_cache.stride()}")
    if k_cache.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"head_dim {k_cache.shape[-1]} exceeds the supported {MAX_HEAD_DIM}")
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.device != device:
            raise ValueError(f"{name} is on {t.device}, expected {device}")
    quantized = k_cache.dtype in QMAX
    if not quantized:
        if k_cache.dtype not in FLOAT_DTYPES:
            raise ValueError(f"unsupported KV-cache dtype {k_cache.dtype}")
        if k_scale is not None or v_scale is not None:
            raise ValueError(f"k_scale/v_scale are only for int8/fp8 caches, this one is {k_cache.dtype}")
        return False
    if k_scale is None or v_scale is None:
        raise ValueError(f"a {k_cache.dtype} cache needs k_scale and v_scale")
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if s.shape != k_cache.shape[:3] or s.dtype != torch.float32 or s.device != device:
            raise ValueError(f"{name} must be float32 {tuple(k_cache.shape[:3])} on {device}, got {s.dtype} "
                             f"{tuple(s.shape)} on {s.device}")
    if k_scale.stride() != v_scale.stride() or k_scale.stride(-1) != 1:
        raise ValueError(f"k_scale/v_scale need equal strides with contiguous heads, got {k_scale.stride()} and "
                         f"{v_scale.stride()}")
    return True


def check_block_tables(block_tables: torch.Tensor, num_seqs: int, max_seq_len: int, block_size: int,
                       device: torch.device) -> None:
    if block_tables.dim() != 2 or block_tables.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_tables must be a 2-D int32/int64 tensor, got {block_tables.dtype} "
                         f"{tuple(block_tables.shape)}")
    if block_tables.device != device:
        raise ValueError(f"block_tables is on {block_tables.device}, expected {device}")
    if block_tables.shape[0] < num_seqs:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows for {num_seqs} sequences")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables rows must be contiguous")
    if max_seq_len > block_tables.shape[1] * block_size:
        raise ValueError(f"a sequence of {max_seq_len} tokens needs more than the {block_tables.shape[1]} blocks "
                         f"of {block_size} in block_tables")


@triton.jit
def round_half_even(y):
    # float32 -> float32 integer values, ties to even like torch.round; exact for |y| < 2**23
    r = tl.floor(y)
    frac = y - r
    is_odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where((frac > 0.5) | ((frac == 0.5) & is_odd), r + 1.0, r)


@triton.jit
def round_to_e4m3(y):
    # float32 -> the nearest float8 e4m3 value (ties to even), still as float32, so the cast that follows is exact.
    # Same result as the hardware conversion; done by hand because the interpreter's float8 conversion drops the
    # carry when rounding up crosses a power of two (124.7 becomes 64, not 128).
    bits = y.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576  # keep 3 of float32's 23 mantissa bits, RNE
    normal = bits.to(tl.float32, bitcast=True)
    subnormal = round_half_even(y * 512.0) * (1.0 / 512.0)  # below 2**-6 the e4m3 step is a fixed 2**-9
    subnormal = tl.where(subnormal == 0.0, y * 0.0, subnormal)  # keep the sign of a zero, as the cast does
    return tl.where(tl.abs(y) < 0.015625, subnormal, normal)


def check_query(q: torch.Tensor, num_kv_heads: int, head_dim: int, rows: str) -> None:
    """q: [rows, num_heads, head_dim], num_heads a multiple of the KV heads, float, head_dim contiguous."""
    if q.dim() != 3 or q.shape[2] != head_dim or q.shape[1] % num_kv_heads:
        raise ValueError(f"q must be [{rows}, num_heads, {head_dim}] with num_heads a multiple of "
                         f"{num_kv_heads} KV heads, got {tuple(q.shape)}")
    if q.dtype not in FLOAT_DTYPES or q.stride(-1) != 1:
        raise ValueError(f"q must be float16/bfloat16/float32 with a contiguous head_dim, got {q.dtype} "
                         f"strides {q.stride()}")
