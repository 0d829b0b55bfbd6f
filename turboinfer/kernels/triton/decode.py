"""Paged decode attention, split over the KV length (Flash-Decoding), then a reduce over the splits.

Write-up: Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference",
https://crfm.stanford.edu/2023/10/12/flashdecoding.html.

Decode reads every cached K/V byte once per step and does little math on it, so it is bound by memory
bandwidth, and bandwidth is only reached when every SM has work. One program per (sequence, KV head) leaves a
single long sequence on 8 of 132 SMs; cutting each sequence's KV range into `num_splits` pieces gives
batch * KV-heads * num_splits programs. Each split keeps its own online softmax and writes its normalised
partial output with the log-sum-exp of its scores; the reduce kernel rescales and sums the partials.

A program serves all query heads of one KV head (the GQA group, padded to 16 rows for tl.dot), so each K/V tile
is read from memory once, not once per query head.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from turboinfer.kernels.triton.common import (check_block_tables, check_cache, check_query, dot_config,
                                             head_dim_block)

PROGRAMS_PER_SM = 4  # resident programs per SM wanted in flight to cover memory latency
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost (load q, write a partial, reduce) is not repaid
MAX_SPLITS = 64


def num_kv_splits(batch: int, num_kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """How many pieces to cut each sequence's KV range into.

    Enough pieces that batch * num_kv_heads * splits programs give every SM PROGRAMS_PER_SM of them, but no
    piece shorter than MIN_TOKENS_PER_SPLIT tokens of the longest sequence, and at most MAX_SPLITS (the reduce
    holds all partials of a head in registers). Depends only on host-side numbers, so choosing it never syncs.
    Examples on 132 SMs, 8 KV heads: batch 1 at 64k tokens -> 64 splits of 1k tokens; batch 1 at 1k -> 4;
    batch 32 at 32k -> 3; batch 64 at any length -> 2 (for load balance when lengths are mixed); batch >= 66 -> 1.
    """
    programs = batch * num_kv_heads
    want = triton.cdiv(PROGRAMS_PER_SM * num_sms, programs)
    by_length = triton.cdiv(max_seq_len, MIN_TOKENS_PER_SPLIT)
    return max(1, min(want, by_length, MAX_SPLITS))


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a nominal few SMs, so small tests still take the split + reduce path
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def _decode_split_kernel(
    Q, K, V, KS, VS, BLOCK_TABLES, SEQ_LENS, O, O_PART, LSE_PART,
    stride_qb, stride_qh, stride_ob, stride_oh,  # q, out [batch, num_heads, head_dim]
    stride_kb, stride_ks, stride_kh,  # k/v cache [num_blocks, block_size, num_kv_heads, head_dim]
    stride_sb, stride_ss,  # k/v scales [num_blocks, block_size, num_kv_heads]
    stride_bt,
    block_size, sm_scale_log2, window, split_len, num_heads,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, QUANT: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    seq = tl.program_id(0)
    head_tile = tl.program_id(1)  # GQA groups wider than BLOCK_H take several programs
    split = tl.program_id(2)
    tiles_per_group = (GROUP + BLOCK_H - 1) // BLOCK_H
    kvh = head_tile // tiles_per_group
    offs_g = (head_tile % tiles_per_group) * BLOCK_H + tl.arange(0, BLOCK_H)  # index within the group
    heads = kvh * GROUP + offs_g
    h_mask = offs_g < GROUP
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM

    seq_len = tl.load(SEQ_LENS + seq).to(tl.int32)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    q = tl.load(Q + seq.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for tok in range(start, end, BLOCK_N):  # empty when this split lies past the sequence's end
        offs_n = tok + tl.arange(0, BLOCK_N)
        n_mask = offs_n < end
        blk = tl.load(table + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
        row = offs_n % block_size
        kv_off = blk * stride_kb + row * stride_ks + kvh * stride_kh
        k = tl.load(K + kv_off[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC)  # [BLOCK_H, BLOCK_N] float32
        if QUANT:
            s = s * tl.load(KS + blk * stride_sb + row * stride_ss + kvh, mask=n_mask, other=0.0)[None, :]
        s = tl.where(n_mask[None, :], s * sm_scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)  # m_new is finite: every tile has at least one key
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if QUANT:
            p = p * tl.load(VS + blk * stride_sb + row * stride_ss + kvh, mask=n_mask, other=0.0)[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(O + seq.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=h_mask[:, None] & d_mask[None, :])
    else:
        # partials: O_PART [batch, num_heads, NUM_SPLITS, BLOCK_D], LSE_PART [batch, num_heads, NUM_SPLITS]
        part = (seq.to(tl.int64) * num_heads + heads) * NUM_SPLITS + split
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(LSE_PART + part, lse, mask=h_mask)
        tl.store(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=h_mask[:, None])


@triton.jit
def _decode_reduce_kernel(
    O_PART, LSE_PART, O, stride_ob, stride_oh, num_heads,
    NUM_SPLITS: tl.constexpr, SPLITS_POW2: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_POW2)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    part = (seq.to(tl.int64) * num_heads + head) * NUM_SPLITS + offs_s
    lse = tl.load(LSE_PART + part, mask=s_mask, other=float("-inf"))  # log2-sum-exp2 of each split's scores
    m = tl.max(lse, 0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty splits
    parts = tl.load(O_PART + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_mask[:, None], other=0.0)
    parts = tl.where(w[:, None] > 0.0, parts, 0.0)  # an empty split's partial is never read into the sum
    out = tl.sum(parts * w[:, None], 0) / tl.maximum(tl.sum(w, 0), 1e-30)
    tl.store(O + seq.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(O.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def plan_decode(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, block_size: int,
                sliding_window: int | None) -> None:
    return None


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                     sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, plan: None = None) -> torch.Tensor:
    """One new token per sequence, all sequences in one batched computation.

    plan: always None here (`plan_decode`): the kernel sizes its splits from max_seq_len on the host, so it needs
    no per-step plan; the argument keeps the signature of the PyTorch twin.

    q: [batch, num_heads, head_dim]; seq_lens: [batch] tokens in the cache including the new one, each at
    most max_seq_len (a host-side bound: the splits are sized from it without reading seq_lens).
    """
    device = q.device
    quantized = check_cache(k_cache, v_cache, k_scale, v_scale, device)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_query(q, num_kv_heads, head_dim, "batch")
    batch, num_heads = q.shape[:2]
    if (seq_lens.dim() != 1 or seq_lens.shape[0] != batch or seq_lens.dtype not in (torch.int32, torch.int64)
            or seq_lens.device != device):
        raise ValueError(f"seq_lens must be int32/int64 [{batch}] on {device}, got {seq_lens.dtype} "
                         f"{tuple(seq_lens.shape)} on {seq_lens.device}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    check_block_tables(block_tables, batch, max_seq_len, block_size, device)
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if batch == 0:
        return out

    group = num_heads // num_kv_heads
    block_d = head_dim_block(head_dim)
    block_h = min(64, max(16, 1 << (group - 1).bit_length()))
    block_n = 64 if block_d <= 128 else 32
    head_tiles = num_kv_heads * triton.cdiv(group, block_h)
    kv_range = min(max_seq_len, sliding_window) if sliding_window is not None else max_seq_len
    num_splits = num_kv_splits(batch, num_kv_heads, kv_range, _num_sms(device))
    split_len = triton.cdiv(triton.cdiv(max(kv_range, 1), num_splits), block_n) * block_n
    if num_splits > 1:
        o_part = torch.empty((batch, num_heads, num_splits, block_d), dtype=torch.float32, device=device)
        lse_part = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
    else:
        o_part = lse_part = out  # unused: one split writes the output directly
    upcast, dot_prec = dot_config(q.dtype, device)
    scales = (k_scale, v_scale) if quantized else (k_cache, v_cache)  # unused pointers when not quantized
    _decode_split_kernel[(batch, head_tiles, num_splits)](
        q, k_cache, v_cache, *scales, block_tables, seq_lens, out, o_part, lse_part,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *(k_scale.stride()[:2] if quantized else (0, 0)),
        block_tables.stride(0),
        block_size, scale * math.log2(math.e), sliding_window or 0, split_len, num_heads,
        NUM_SPLITS=num_splits, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_H=block_h, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, QUANT=quantized, UPCAST=upcast, DOT_PREC=dot_prec,
        num_warps=4, num_stages=2,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            o_part, lse_part, out, out.stride(0), out.stride(1), num_heads,
            NUM_SPLITS=num_splits, SPLITS_POW2=triton.next_power_of_2(num_splits), HEAD_DIM=head_dim,
            BLOCK_D=block_d, num_warps=4,
        )
    return out
