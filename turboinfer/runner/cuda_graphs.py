"""Decode steps replayed from CUDA graphs, one per batch-size bucket, over preallocated input buffers.

A decode step of a model on a GPU is hundreds of small kernel launches; launched from Python each costs several
microseconds, which at batch 1 is more than the kernels themselves. So at start-up the decode forward (embedding
to logits) is captured once per bucket size into a CUDA graph that reads its inputs from fixed buffers; a step
copies its DecodeBatch (ids, positions, lengths, and per KV group slots and block tables) into those buffers (rows past the batch are padding: token 0 at
position 0, writing its K/V into the reserved null block 0) and replays the graph of the smallest bucket that
holds it. Attention is sized for `max_seq_len` at capture (the Flash-Decoding kernel's splits past a sequence's
length do no work), so one graph serves every context length.

`capture=False` runs the same buffers eagerly: that is how the buffer logic is tested on machines without CUDA."""

from __future__ import annotations

import time

import torch

from turboinfer.kernels.metadata import AttentionMetadata, KVGroupMetadata
from turboinfer.layers.rotary import index_rotaries, rope_for_step
from turboinfer.runner.decode_backend import DecodeBatch

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, ops, block_size: int, max_batch: int, max_seq_len: int,
                 windows: list[int | None], device: torch.device, dtype: torch.dtype, capture: bool = True) -> None:
        """windows: per KV group, its sliding window (None: full attention); each group has its own tables.
        dtype: the activations' (the gathered rotary rows are cast to it)."""
        self.model, self.ops, self.block_size, self.dtype = model, ops, block_size, dtype
        self.rotaries = index_rotaries(model)
        self.max_seq_len = max_seq_len
        self.windows = windows
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.capture_enabled = capture
        n, width, groups = self.buckets[-1], -(-max_seq_len // block_size), len(windows)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(groups, n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(groups, n, width, dtype=torch.int64, device=device)
        # Host staging for one step's inputs, pinned so the copies are asynchronous: [ids | positions | lens | slots]
        pin = device.type == "cuda"
        self._host = torch.zeros(3 + groups, n, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(groups, n, width, dtype=torch.int64, pin_memory=pin)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, n: int) -> torch.Tensor:
        groups = []
        for gi, window in enumerate(self.windows):
            tables = self.block_tables[gi, :n]
            plan = self.ops.plan_decode(tables, self.seq_lens[:n], self.max_seq_len, self.block_size, window)
            groups.append(KVGroupMetadata(self.slot_mapping[gi, :n], tables, tables[:0], plan))
        meta = AttentionMetadata(
            ops=self.ops, num_decode_tokens=n, decode_seq_lens=self.seq_lens[:n], decode_max_seq_len=self.max_seq_len,
            prefill_query_lens=[], prefill_seq_lens=[], groups=groups,
            rope=rope_for_step(self.rotaries, self.positions[:n], self.dtype))
        hidden = self.model(self.input_ids[:n], self.positions[:n], meta)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per bucket, largest first, all sharing one memory pool (their lifetimes never
        overlap: one step replays one graph)."""
        if not self.capture_enabled:
            return
        t0 = time.monotonic()
        pool = None
        for n in reversed(self.buckets):
            self._forward(n)  # warm-up: Triton compiles and autotunes outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[n] = self._forward(n)
            pool = graph.pool()
            self.graphs[n] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.monotonic() - t0

    def __call__(self, batch: DecodeBatch) -> torch.Tensor:
        """One token per sequence (batch.size <= max_batch) -> logits [batch.size, vocab]."""
        n = batch.size
        bucket = next(b for b in self.buckets if b >= n)
        # Padding rows (left as zeros, lengths 1): token 0 at position 0, its K/V written into the null block 0.
        host = self._host
        host[:, n:bucket] = 0
        host[2, n:bucket] = 1
        host[0, :n], host[1, :n], host[2, :n] = batch.input_ids, batch.positions, batch.seq_lens
        for gi, (tables, slots) in enumerate(zip(batch.block_tables, batch.slot_mapping)):
            host[3 + gi, :n] = slots
            width = tables.shape[1]
            self._host_tables[gi, :bucket, :width] = 0
            self._host_tables[gi, :n, :width] = tables
        width = max(t.shape[1] for t in batch.block_tables)
        for dst, src in zip((self.input_ids, self.positions, self.seq_lens), host[:3]):
            dst[:bucket].copy_(src[:bucket], non_blocking=True)
        self.slot_mapping[:, :bucket].copy_(host[3:, :bucket], non_blocking=True)
        self.block_tables[:, :bucket, :width].copy_(self._host_tables[:, :bucket, :width], non_blocking=True)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        with torch.inference_mode():
            return self._forward(bucket)[:n]
