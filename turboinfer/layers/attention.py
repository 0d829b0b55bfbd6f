"""The attention layer: writes this step's K/V into the paged cache, then attends through the op table.
Tokens arrive flattened: the first `num_decode_tokens` are single-token decodes, the rest prefill chunks."""

from __future__ import annotations

import torch
from torch import nn

from turboinfer.kernels.metadata import AttentionMetadata
from turboinfer.kv_cache.spec import FULL, SLIDING, KVCacheSpec


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        # Set by the model runner once the KV pool is allocated: [num_blocks, block_size, kv_heads, head_dim]
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)
        # int8 / fp8 caches only: [num_blocks, block_size, kv_heads] float32 per-token scales
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        self.kv_group = 0  # which of the step's KV groups (block tables, slots) this layer's cache belongs to

    def kv_cache_spec(self, dtype: str) -> KVCacheSpec:
        """What this layer keeps per token, stored in `dtype`: the KV manager groups layers by it."""
        kind = FULL if self.sliding_window is None else SLIDING
        return KVCacheSpec(kind, self.num_kv_heads, self.head_dim, dtype, self.sliding_window)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: [num_tokens, num_heads, head_dim]; k, v: [num_tokens, num_kv_heads, head_dim]
        ops, g = meta.ops, meta.groups[self.kv_group]
        kv_scales = dict(k_scale=self.k_scale, v_scale=self.v_scale)
        ops.store_kv(k, v, self.k_cache, self.v_cache, g.slot_mapping, **kv_scales)
        nd = meta.num_decode_tokens
        if nd == q.shape[0]:
            return ops.decode_attention(q, self.k_cache, self.v_cache, g.decode_block_tables, meta.decode_seq_lens,
                                        meta.decode_max_seq_len, self.scale, self.sliding_window, **kv_scales,
                                        plan=g.decode_plan)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if nd:
            out[:nd] = ops.decode_attention(q[:nd], self.k_cache, self.v_cache, g.decode_block_tables,
                                            meta.decode_seq_lens, meta.decode_max_seq_len, self.scale,
                                            self.sliding_window, **kv_scales, plan=g.decode_plan)
        out[nd:] = ops.prefill_attention(q[nd:], self.k_cache, self.v_cache, g.prefill_block_tables,
                                         meta.prefill_query_lens, meta.prefill_seq_lens, self.scale,
                                         self.sliding_window, **kv_scales)
        return out
