"""Decode steps replayed from CUDA graphs, one per batch-size bucket, over preallocated input buffers.

A decode step of a model on a GPU is hundreds of small kernel launches; launched from Python each costs several
microseconds, which at batch 1 is more than the kernels themselves. So at start-up the decode forward (embedding
to logits) is captured once per bucket size into a CUDA graph that reads its inputs from fixed buffers; a step
copies its ids, positions, slots and block tables into those buffers (rows past the batch are padding: token 0 at
position 0, writing its K/V into the reserved null block 0) and replays the graph of the smallest bucket that
holds it. Attention is sized for `max_seq_len` at capture (the Flash-Decoding kernel's splits past a sequence's
length do no work), so one graph serves every context length.

`capture=False` runs the same buffers eagerly: that is how the buffer logic is tested on machines without CUDA."""

from __future__ import annotations

import time

import torch

from turboinfer.runner.attention_metadata import AttentionMetadata

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


class DecodeGraphs:
    def __init__(self, model: torch.nn.Module, ops, block_size: int, max_batch: int, max_seq_len: int,
                 device: torch.device, capture: bool = True) -> None:
        self.model, self.ops, self.block_size = model, ops, block_size
        self.max_seq_len = max_seq_len
        self.buckets = [b for b in BUCKETS if b < max_batch] + [max_batch]
        self.capture_enabled = capture
        n, width = self.buckets[-1], -(-max_seq_len // block_size)
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(n, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(n, width, dtype=torch.int64, device=device)
        # Host staging for one step's inputs, pinned so the copies are asynchronous: [ids | positions | slots | lens]
        pin = device.type == "cuda"
        self._host = torch.zeros(4, n, dtype=torch.int64, pin_memory=pin)
        self._host_tables = torch.zeros(n, width, dtype=torch.int64, pin_memory=pin)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def _forward(self, n: int) -> torch.Tensor:
        meta = AttentionMetadata(
            ops=self.ops, slot_mapping=self.slot_mapping[:n], num_decode_tokens=n,
            decode_seq_lens=self.seq_lens[:n], decode_max_seq_len=self.max_seq_len,
            decode_block_tables=self.block_tables[:n], prefill_query_lens=[], prefill_seq_lens=[],
            prefill_block_tables=self.block_tables[:0])
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

    def run(self, input_ids: list[int], positions: list[int], block_tables: list[list[int]]) -> torch.Tensor:
        """One token per sequence (len <= max_batch) -> logits [len, vocab]."""
        n = len(input_ids)
        bucket = next(b for b in self.buckets if b >= n)
        pad, bs = bucket - n, self.block_size
        width = max(len(t) for t in block_tables)
        # Padding rows: token 0 at position 0, its K/V written into the reserved null block 0.
        self._host[:, :bucket] = torch.tensor([
            input_ids + [0] * pad, positions + [0] * pad,
            [t[p // bs] * bs + p % bs for p, t in zip(positions, block_tables)] + [0] * pad,
            [p + 1 for p in positions] + [1] * pad])
        self._host_tables[:bucket, :width] = torch.tensor([t + [0] * (width - len(t)) for t in block_tables] +
                                                          [[0] * width] * pad)
        for dst, src in zip((self.input_ids, self.positions, self.slot_mapping, self.seq_lens), self._host):
            dst[:bucket].copy_(src[:bucket], non_blocking=True)
        self.block_tables[:bucket, :width].copy_(self._host_tables[:bucket, :width], non_blocking=True)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        with torch.inference_mode():
            return self._forward(bucket)[:n]
