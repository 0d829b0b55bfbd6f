"""Causal prefill attention over the paged cache: FlashAttention-2 tiling with an online softmax.

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
https://arxiv.org/abs/2307.08691.

A program owns BLOCK_M queries of one sequence and one query head. The chunk's queries are the last
query_len positions of the sequence (ctx_len = seq_len - query_len tokens are already cached), so chunked
prefill over a cached prefix is the general case, not a special one. K/V are read straight from the paged cache
through the block table, one BLOCK_N tile at a time, for the KV head the query head belongs to (GQA/MQA never
repeat K/V). Tiles left of the query tile's diagonal need no causal mask and run in a loop without one; the
tiles that straddle it run with the full mask.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from turboinfer.kernels.triton.common import (check_block_tables, check_cache, check_query, dot_config,
                                             head_dim_block)


@triton.jit
def _attend_tiles(
    acc, m_i, l_i, q, q_pos, lo, hi, table, kvh,
    K, V, KS, VS, stride_kb, stride_ks, stride_kh, stride_sb, stride_ss, block_size, sm_scale_log2, window,
    offs_d, d_mask, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr,
    QUANT: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # Keys lo .. hi-1. Without MASKED, lo..hi is a whole number of tiles left of the tile's first query, so every
    # key is causally visible to every query and the scores need no causal mask (only the window's, if any).
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        blk = tl.load(table + offs_n // block_size, mask=n_mask, other=0).to(tl.int64)
        row = offs_n % block_size
        kv_off = blk * stride_kb + row * stride_ks + kvh * stride_kh
        k = tl.load(K + kv_off[None, :] + offs_d[:, None], mask=n_mask[None, :] & d_mask[:, None], other=0.0)
        s = tl.dot(q, k.to(q.dtype), input_precision=DOT_PREC)  # [BLOCK_M, BLOCK_N] float32
        if QUANT:
            k_s = tl.load(KS + blk * stride_sb + row * stride_ss + kvh, mask=n_mask, other=0.0)
            s = s * k_s[None, :]
        s = s * sm_scale_log2
        if MASKED:
            visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
            if HAS_WINDOW:
                visible = visible & (offs_n[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        elif HAS_WINDOW:
            s = tl.where(offs_n[None, :] > q_pos[:, None] - window, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row that has seen no key yet stays at 0
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + kv_off[:, None] + offs_d[None, :], mask=n_mask[:, None] & d_mask[None, :], other=0.0)
        if QUANT:
            v_s = tl.load(VS + blk * stride_sb + row * stride_ss + kvh, mask=n_mask, other=0.0)
            p = p * v_s[None, :]  # P @ (codes * scale) == (P * scale) @ codes
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    Q, K, V, KS, VS, O, BLOCK_TABLES, CU_Q, SEQ_LENS,
    stride_qt, stride_qh, stride_ot, stride_oh,  # q, out [num_tokens, num_heads, head_dim]
    stride_kb, stride_ks, stride_kh,  # k/v cache [num_blocks, block_size, num_kv_heads, head_dim]
    stride_sb, stride_ss,  # k/v scales [num_blocks, block_size, num_kv_heads]
    stride_bt,
    block_size, sm_scale_log2, window,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr, QUANT: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    tile = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(CU_Q + seq)
    q_len = tl.load(CU_Q + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(SEQ_LENS + seq) - q_len  # tokens before this chunk
    kvh = head // GROUP

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                mask=m_mask[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    q_pos = ctx_len + offs_m  # [BLOCK_M] absolute positions

    # Keys some query of the tile can see: [lo, hi); keys before `mid` (whole tiles) are visible to all of them.
    first_pos = ctx_len + tile * BLOCK_M
    hi = tl.minimum(first_pos + BLOCK_M, ctx_len + q_len)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0)
    mid = lo + ((first_pos + 1 - lo) // BLOCK_N) * BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table = BLOCK_TABLES + seq.to(tl.int64) * stride_bt
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, lo, mid, table, kvh, K, V, KS, VS, stride_kb, stride_ks, stride_kh,
        stride_sb, stride_ss, block_size, sm_scale_log2, window, offs_d, d_mask,
        BLOCK_N, False, HAS_WINDOW, QUANT, DOT_PREC)
    acc, m_i, l_i = _attend_tiles(
        acc, m_i, l_i, q, q_pos, mid, hi, table, kvh, K, V, KS, VS, stride_kb, stride_ks, stride_kh,
        stride_sb, stride_ss, block_size, sm_scale_log2, window, offs_d, d_mask,
        BLOCK_N, True, HAS_WINDOW, QUANT, DOT_PREC)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    o_rows = (q_start + offs_m).to(tl.int64)
    tl.store(O + o_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _tile_config(max_query_len: int, block_d: int, wide: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Short chunks (a few draft tokens to verify, a prompt's last
    tokens) get a short query tile rather than a 128-row one that is mostly padding. `wide`: float32 tiles,
    twice the bytes, so fewer of them are kept in flight in shared memory."""
    block_m = min(128 if block_d <= 128 and not wide else 64, max(16, 1 << (max_query_len - 1).bit_length()))
    block_n = 64 if block_d <= 128 else 32
    num_warps = 8 if block_m * block_d >= 128 * 128 else 4
    return block_m, block_n, num_warps, 3 if block_d <= 128 and not wide else 2


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_lens: list[int], seq_lens: list[int], scale: float,
                      sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for chunks of new tokens whose K/V are already stored in the cache.

    q: [sum(query_lens), num_heads, head_dim]; sequence i's queries sit at positions
    seq_lens[i] - query_lens[i] .. seq_lens[i] - 1 and see keys 0 .. their own position.
    """
    device = q.device
    quantized = check_cache(k_cache, v_cache, k_scale, v_scale, device)
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    check_query(q, num_kv_heads, head_dim, "num_tokens")
    if len(query_lens) != len(seq_lens) or sum(query_lens) != q.shape[0]:
        raise ValueError(f"{len(query_lens)} query_lens summing to {sum(query_lens)} and {len(seq_lens)} seq_lens "
                         f"do not describe q's {q.shape[0]} tokens")
    if any(not 0 <= ql <= sl for ql, sl in zip(query_lens, seq_lens)):
        raise ValueError(f"every query_len must be in [0, seq_len]: {query_lens} vs {seq_lens}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    check_block_tables(block_tables, len(seq_lens), max(seq_lens, default=0), block_size, device)
    out = torch.empty(q.shape, dtype=q.dtype, device=device)
    if q.shape[0] == 0:
        return out

    num_seqs, num_heads = len(seq_lens), q.shape[1]
    cu_q = [0]
    for ql in query_lens:
        cu_q.append(cu_q[-1] + ql)
    lens = torch.tensor(cu_q + list(seq_lens), dtype=torch.int32).to(device, non_blocking=True)
    block_d = head_dim_block(head_dim)
    block_m, block_n, num_warps, num_stages = _tile_config(max(query_lens), block_d, q.dtype == torch.float32)
    upcast, dot_prec = dot_config(q.dtype, device)
    scales = (k_scale, v_scale) if quantized else (k_cache, v_cache)  # unused pointers when not quantized
    grid = (triton.cdiv(max(query_lens), block_m), num_seqs, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, *scales, out, block_tables, lens, lens[num_seqs + 1:],
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        *(k_scale.stride()[:2] if quantized else (0, 0)),
        block_tables.stride(0),
        block_size, scale * math.log2(math.e), sliding_window or 0,
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_WINDOW=sliding_window is not None, QUANT=quantized, UPCAST=upcast, DOT_PREC=dot_prec,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out
