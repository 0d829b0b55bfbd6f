"""What every attention layer needs to find a step's tokens in the paged cache. Built once per step by the model
runner and shared by all layers; it sits below the layers so models and kernels need nothing above them.

Cache rows and positions are separate things: `positions` (given to the model, for RoPE) say where a token sits in
its sequence, while slot mappings and `*_seq_lens` count rows of the cache. Today a request's row r holds position
r; KV eviction and SUBLLM's shorter inner layers make them differ, and nothing here assumes they are equal.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch


@dataclass
class KVGroupMetadata:
    """The step's view of one KV cache group (layers sharing a spec, kv_cache/spec.py)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: flat row of this group's pool each new token's K/V goes to
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with the null block 0
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int64
    decode_plan: Any = None  # ops.plan_decode of the decode tables, made once per step for all the group's layers


@dataclass
class AttentionMetadata:
    ops: SimpleNamespace  # the backend's op table (kernels.get_ops)
    num_decode_tokens: int  # the first this many tokens are one-token decodes, one per sequence
    decode_seq_lens: torch.Tensor  # [num_decodes] int64: cache rows including the new one
    decode_max_seq_len: int  # host copy of decode_seq_lens.max(), so kernels need not sync to size buffers
    prefill_query_lens: list[int]  # per prefill sequence: new rows in this step
    prefill_seq_lens: list[int]  # per prefill sequence: cache rows including the new ones
    groups: list[KVGroupMetadata]  # indexed by each attention layer's kv_group
    rope: list[tuple[torch.Tensor, torch.Tensor]]  # per rotary table (its table_id): cos, sin [num_tokens, 1, d/2]
