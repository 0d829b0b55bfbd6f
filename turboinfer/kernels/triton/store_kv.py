"""Write this step's K/V rows into the paged cache, quantizing them on the way for int8 / fp8 caches.

One program per (token, KV head): it reads the head's K and V rows once, and for a quantized cache computes the
symmetric per-token, per-head scale amax / QMAX exactly as the PyTorch twin's `quantize_kv` does (IEEE division,
round half to even), so both backends store identical codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from turboinfer.kernels.torch_ref.attention import QMAX
from turboinfer.kernels.triton.common import FLOAT_DTYPES, check_cache, next_pow2, round_half_even, round_to_e4m3


@triton.jit
def _store_kv_kernel(
    K, V, KC, VC, KS, VS, SLOTS,
    stride_kt, stride_kh, stride_vt, stride_vh,  # new rows [num_tokens, num_kv_heads, head_dim]
    stride_cb, stride_cs, stride_ch,  # cache [num_blocks, block_size, num_kv_heads, head_dim]
    stride_sb, stride_ss,  # scales [num_blocks, block_size, num_kv_heads]
    block_size,
    qmax,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, QUANT: tl.constexpr, IS_INT8: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(SLOTS + tok).to(tl.int64)
    if slot < 0:  # padding rows (a batch padded to a captured size) have no cache row
        return
    blk = slot // block_size
    row = slot % block_size
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    k = tl.load(K + tok * stride_kt + head * stride_kh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    v = tl.load(V + tok * stride_vt + head * stride_vh + offs_d, mask=d_mask, other=0.0).to(tl.float32)
    dst = blk * stride_cb + row * stride_cs + head * stride_ch + offs_d
    if QUANT:
        k_s = tl.div_rn(tl.maximum(tl.max(tl.abs(k), 0), 1e-8), qmax)
        v_s = tl.div_rn(tl.maximum(tl.max(tl.abs(v), 0), 1e-8), qmax)
        k = tl.div_rn(k, k_s)
        v = tl.div_rn(v, v_s)
        if IS_INT8:
            k = tl.minimum(tl.maximum(round_half_even(k), -127.0), 127.0)
            v = tl.minimum(tl.maximum(round_half_even(v), -127.0), 127.0)
        else:
            k = round_to_e4m3(k)
            v = round_to_e4m3(v)
        tl.store(KS + blk * stride_sb + row * stride_ss + head, k_s)
        tl.store(VS + blk * stride_sb + row * stride_ss + head, v_s)
    tl.store(KC + dst, k.to(KC.dtype.element_ty), mask=d_mask)
    tl.store(VC + dst, v.to(VC.dtype.element_ty), mask=d_mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    # key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] flat row ids
    device = key.device
    quantized = check_cache(k_cache, v_cache, k_scale, v_scale, device)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    if key.dim() != 3 or key.shape != value.shape or key.shape[1:] != (num_kv_heads, head_dim):
        raise ValueError(f"key/value must both be [num_tokens, {num_kv_heads}, {head_dim}], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype not in FLOAT_DTYPES or value.dtype not in FLOAT_DTYPES:
        raise ValueError(f"key/value must be float16/bfloat16/float32, got {key.dtype} and {value.dtype}")
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value need a contiguous head_dim")
    if value.device != device:
        raise ValueError(f"value is on {value.device}, key on {device}")
    if (slot_mapping.dim() != 1 or slot_mapping.shape[0] != key.shape[0]
            or slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.device != device):
        raise ValueError(f"slot_mapping must be int32/int64 [{key.shape[0]}] on {device}, got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)} on {slot_mapping.device}")
    if key.shape[0] == 0:
        return
    scales = (k_scale, v_scale) if quantized else (k_cache, v_cache)  # unused pointers when not quantized
    s_strides = k_scale.stride()[:2] if quantized else (0, 0)
    _store_kv_kernel[(key.shape[0], num_kv_heads)](
        key, value, k_cache, v_cache, *scales, slot_mapping.contiguous(),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), *s_strides,
        block_size, QMAX.get(k_cache.dtype, 1.0),
        HEAD_DIM=head_dim, BLOCK_D=next_pow2(head_dim), QUANT=quantized, IS_INT8=k_cache.dtype == torch.int8,
        num_warps=1 if head_dim <= 128 else 2,
    )
