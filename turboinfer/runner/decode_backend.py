"""The whole-step decode paths behind one protocol: the C step on CPU (runner/cpu_decode.py) and captured CUDA
graphs on GPU (runner/cuda_graphs.py). The runner builds one `DecodeBatch` per decode step, on the host, and hands
it to whichever backend takes it; the backend returns the logits of every sequence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch


@dataclass
class DecodeBatch:
    """One new token per sequence. Host (CPU) int64 tensors, built once per step."""

    input_ids: torch.Tensor  # [batch]
    positions: torch.Tensor  # [batch] the token's position in its sequence (RoPE)
    seq_lens: torch.Tensor  # [batch] cache rows including the new one (not assumed to be positions + 1)
    block_tables: list[torch.Tensor]  # per KV group: [batch, width] padded with the null block 0
    slot_mapping: list[torch.Tensor]  # per KV group: [batch] flat cache row the new K/V go to

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def build(cls, tokens: list[int], positions: list[int], rows: list[int], tables: list[list[list[int]]],
              block_size: int) -> "DecodeBatch":
        """tokens/positions/rows: per sequence (rows = cache rows before this token); tables: per group, per
        sequence."""
        seq_lens = torch.tensor(rows, dtype=torch.int64) + 1
        padded, slots = [], []
        for group in tables:
            width = max(len(t) for t in group)
            padded.append(torch.tensor([t + [0] * (width - len(t)) for t in group], dtype=torch.int64))
            slots.append(torch.tensor([t[r // block_size] * block_size + r % block_size for t, r in zip(group, rows)],
                                      dtype=torch.int64))
        return cls(torch.tensor(tokens, dtype=torch.int64), torch.tensor(positions, dtype=torch.int64), seq_lens,
                   padded, slots)


class DecodeBackend(Protocol):
    max_batch: int  # largest batch it takes

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        """-> logits [batch.size, vocab] float32 on the model's device."""
        ...
