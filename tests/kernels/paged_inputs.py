"""Random paged caches for the kernel tests: sequences scattered over shuffled blocks, written by the twin."""

from __future__ import annotations

import torch

from turboinfer.kernels.torch_ref.attention import QMAX, store_kv

# Tolerances against the twin, by query dtype: float32 only differs in summation order; 16-bit in where the
# kernels and the twin round their intermediates.
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-4), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


class PagedKV:
    """A layer's cache holding `seq_lens` tokens per sequence. Block 0 is the null block that padded block-table
    entries point at; every sequence owns distinct blocks in shuffled order, so a kernel that ignored the table
    (or read past a sequence's end) would read another sequence's keys."""

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None, device: torch.device, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        kv_dtype = kv_dtype or dtype
        blocks_per_seq = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_per_seq) + 3
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=kv_dtype, device=device)
        self.k_scale = self.v_scale = None
        if kv_dtype in QMAX:
            self.k_scale = torch.zeros(shape[:3], device=device)
            self.v_scale = torch.zeros(shape[:3], device=device)
        ids = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
        width = max(blocks_per_seq, default=0) + 1  # one spare padded column, like the runner's tables
        rows = []
        for n in blocks_per_seq:
            rows.append(ids[:n] + [0] * (width - n))
            ids = ids[n:]
        self.block_tables = torch.tensor(rows, dtype=torch.int64, device=device).view(len(seq_lens), width)
        self.block_size = block_size
        for i, n in enumerate(seq_lens):
            # per-token magnitudes vary a lot, as real keys do; the quantized caches must cope with that
            k = torch.randn(n, num_kv_heads, head_dim, generator=gen) * torch.rand(n, 1, 1, generator=gen).add(0.2) * 2
            v = torch.randn(n, num_kv_heads, head_dim, generator=gen)
            store_kv(k.to(device, dtype), v.to(device, dtype), self.k_cache, self.v_cache, self.slots(i, 0, n),
                     self.k_scale, self.v_scale)

    def slots(self, seq: int, start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end, device=self.block_tables.device)
        return self.block_tables[seq, pos // self.block_size] * self.block_size + pos % self.block_size

    def args(self) -> tuple:
        return self.k_cache, self.v_cache

    def scales(self) -> dict:
        return dict(k_scale=self.k_scale, v_scale=self.v_scale)
