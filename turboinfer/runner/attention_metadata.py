"""What every attention layer needs to find a step's tokens in the paged cache. Built once per step by
the model runner and shared by all layers."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch


@dataclass
class AttentionMetadata:
    ops: SimpleNamespace  # the backend's op table (kernels.get_ops)
    slot_mapping: torch.Tensor  # [num_tokens] int64: flat cache row each new token's K/V is written to
    num_decode_tokens: int  # the first this many tokens are one-token decodes, one per sequence
    decode_seq_lens: torch.Tensor  # [num_decodes] int64: cached tokens including the new one
    decode_max_seq_len: int  # host copy of decode_seq_lens.max(), so kernels need not sync to size buffers
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int64, padded with the null block 0
    prefill_query_lens: list[int]  # per prefill sequence: new tokens in this step
    prefill_seq_lens: list[int]  # per prefill sequence: cached tokens including the new ones
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int64
