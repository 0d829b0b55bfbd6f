"""Attention over the paged KV cache in plain PyTorch.

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim]. A sequence's
token at position p lives in block block_table[p // block_size], row p % block_size. Grouped-query
attention is computed by viewing the query heads as [num_kv_heads, group] so K/V are never repeated.

Quantized caches (int8, float8_e4m3fn) carry k_scale, v_scale [num_blocks, block_size, num_kv_heads] float32:
one symmetric scale per token and head, so a token's K/V never change once written (no re-quantization as
the block fills) and an outlier token cannot blur its neighbours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """[tokens, heads, dim] -> (codes in `dtype`, scale [tokens, heads] float32) with x ~= codes * scale."""
    scale = x.float().abs().amax(-1).clamp_(min=1e-8) / QMAX[dtype]
    y = x.float() / scale[..., None]
    codes = y.round_().clamp_(-127, 127).to(dtype) if dtype == torch.int8 else y.to(dtype)
    return codes, scale


def store_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
             v_scale: torch.Tensor | None = None) -> None:
    # key, value: [num_tokens, num_kv_heads, head_dim]; slot_mapping: [num_tokens] flat row ids
    if k_scale is not None:
        key, ks = quantize_kv(key, k_cache.dtype)
        value, vs = quantize_kv(value, v_cache.dtype)
        k_scale.view(-1, k_scale.shape[2]).index_copy_(0, slot_mapping, ks)
        v_scale.view(-1, v_scale.shape[2]).index_copy_(0, slot_mapping, vs)
    for cache, x in ((k_cache, key), (v_cache, value)):
        _raw(cache).view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, _raw(x.to(cache.dtype)))


def _raw(t: torch.Tensor) -> torch.Tensor:
    # CPU index kernels lack float8; its bytes move the same as uint8
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _gather_blocks(cache: torch.Tensor, scale: torch.Tensor | None, blocks: torch.Tensor) -> torch.Tensor:
    # blocks: [n] block ids -> [n, block_size, kv_heads, head_dim] float32 (dequantized if the cache is)
    x = _raw(cache).index_select(0, blocks).view(cache.dtype).float()  # far cheaper than cache[blocks]
    return x if scale is None else x * scale.index_select(0, blocks)[..., None]


def _gather(cache: torch.Tensor, scale: torch.Tensor | None, block_table: torch.Tensor,
            num_tokens: int) -> torch.Tensor:
    # -> [num_tokens, num_kv_heads, head_dim] for one sequence
    blocks = block_table[: -(-num_tokens // cache.shape[1])]
    return _gather_blocks(cache, scale, blocks).flatten(0, 1)[:num_tokens]


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                      query_lens: list[int], seq_lens: list[int], scale: float,
                      sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                      v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention for chunks of new tokens whose K/V are already stored in the cache.

    q: [sum(query_lens), num_heads, head_dim]; sequence i's queries sit at positions
    seq_lens[i] - query_lens[i] .. seq_lens[i] - 1 and see keys 0 .. their own position.
    """
    out = torch.empty_like(q)
    start = 0
    for i, (q_len, kv_len) in enumerate(zip(query_lens, seq_lens)):
        qi = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1, H, q_len, D]
        k = _gather(k_cache, k_scale, block_tables[i], kv_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        v = _gather(v_cache, v_scale, block_tables[i], kv_len).transpose(0, 1).unsqueeze(0).to(q.dtype)
        if q_len == kv_len and sliding_window is None:
            o = F.scaled_dot_product_attention(qi, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=q.device)[:, None]
            k_pos = torch.arange(kv_len, device=q.device)[None, :]
            mask = k_pos <= q_pos
            if sliding_window is not None:
                mask &= k_pos > q_pos - sliding_window
            o = F.scaled_dot_product_attention(qi, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        out[start:start + q_len] = o[0].transpose(0, 1)
        start += q_len
    return out


DECODE_GATHER_TOKENS = 16384  # K/V rows one decode gather may hold (memory/inference.py counts the same)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                     seq_lens: torch.Tensor, max_seq_len: int, scale: float,
                     sliding_window: int | None = None, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None, plan: list | None = None) -> torch.Tensor:
    """One new token per sequence, computed a group of sequences at a time.

    q: [batch, num_heads, head_dim]; seq_lens: [batch] tokens in the cache including the new one.
    Each group's K/V are gathered (as float32) padded to its longest sequence and the padding masked out. When
    the whole batch padded to max_seq_len fits in DECODE_GATHER_TOKENS rows it is one group; otherwise sequences
    are grouped longest first so that no group gathers more than DECODE_GATHER_TOKENS rows (or one sequence's
    own), instead of every sequence padded to the longest: 64 decodes beside one at 8,192 tokens would gather
    524,288 rows, 800 MiB for SmolLM2-135M.

    plan: `plan_decode` of these same arguments; the runner computes it once per step and KV group and every
    layer of the group reuses it (None: computed here).
    """
    groups = plan if plan is not None else plan_decode(block_tables, seq_lens, max_seq_len, k_cache.shape[1],
                                                       sliding_window)
    if len(groups) == 1:
        return _decode_group(q, k_cache, v_cache, k_scale, v_scale, *groups[0][1:], scale)
    out = torch.empty_like(q)
    for rows, flat, mask in groups:
        out[rows] = _decode_group(q[rows], k_cache, v_cache, k_scale, v_scale, flat, mask, scale)
    return out


def _decode_group(q, k_cache, v_cache, k_scale, v_scale, flat, mask, scale):
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    # [batch, kv_heads, L, D] with L = a whole number of blocks. The math runs in float32: on CPUs the small
    # batched matmuls of decode are ~2x faster in float32 than in bfloat16, and it is the reference anyway.
    k = _gather_blocks(k_cache, k_scale, flat).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    v = _gather_blocks(v_cache, v_scale, flat).view(batch, -1, num_kv_heads, head_dim).transpose(1, 2)
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    scores = torch.matmul(qg, k.transpose(-1, -2)).mul_(scale).add_(mask)  # [batch, kv_heads, group, L]
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(batch, num_heads, head_dim).to(q.dtype)


def plan_decode(block_tables: torch.Tensor, seq_lens: torch.Tensor, max_seq_len: int, block_size: int,
                sliding_window: int | None) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
    """[(batch rows or None for all, flat block ids, additive key mask [rows, 1, 1, L])] per group of decodes:
    depends only on the step's block tables and lengths, so one plan serves every layer that shares them."""
    padded = -(-max_seq_len // block_size) * block_size
    batch = seq_lens.shape[0]
    capturing = seq_lens.is_cuda and torch.cuda.is_current_stream_capturing()  # shapes fixed at capture
    if batch * padded <= DECODE_GATHER_TOKENS or batch == 1 or capturing:
        groups = [(None, max_seq_len, block_tables, seq_lens)]
    else:
        groups = []
        order = torch.argsort(seq_lens, descending=True)
        lens = seq_lens[order].tolist()
        start = 0
        while start < batch:
            width = -(-lens[start] // block_size) * block_size  # the group's longest, padded to blocks
            n = max(1, min(batch - start, DECODE_GATHER_TOKENS // width))
            rows = order[start:start + n]
            groups.append((rows, lens[start], block_tables[rows], seq_lens[rows]))
            start += n
    return [(rows, *_group_plan(tables, lens, longest, block_size, sliding_window))
            for rows, longest, tables, lens in groups]


def _group_plan(block_tables, seq_lens, max_seq_len, block_size, sliding_window):
    num_blocks = -(-max_seq_len // block_size)
    flat = block_tables[:, :num_blocks].reshape(-1)
    k_pos = torch.arange(num_blocks * block_size, device=seq_lens.device)[None, :]
    masked = k_pos >= seq_lens[:, None]
    if sliding_window is not None:
        masked |= k_pos <= (seq_lens[:, None] - 1 - sliding_window)
    mask = torch.zeros(masked.shape, dtype=torch.float32, device=seq_lens.device).masked_fill_(
        masked, float("-inf"))[:, None, None, :]
    return flat, mask
