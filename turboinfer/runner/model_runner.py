"""Executes one scheduled step: updates its per-request state from the step contract, builds the flat token batch
and its attention metadata, runs the model, computes logits only for the rows that need them, samples."""

from __future__ import annotations

import contextlib

import torch

from turboinfer.engine.batch import ModelOutput, ScheduledSeq, SchedulerOutput, SeqResult
from turboinfer.kernels import get_ops
from turboinfer.kernels.metadata import AttentionMetadata, KVGroupMetadata
from turboinfer.kv_cache.spec import KVCacheGroup
from turboinfer.layers.rotary import index_rotaries, rope_for_step
from turboinfer.runner.cpu_decode import create_cpu_decoder
from turboinfer.runner.cuda_graphs import DecodeGraphs
from turboinfer.runner.decode_backend import DecodeBackend, DecodeBatch
from turboinfer.runner.kv_alloc import resident_bytes, zeroed
from turboinfer.runner.request_state import RequestState, RequestStates
from turboinfer.runner.sampler import Sampler, top_logprobs
from turboinfer.runner.staging import to_device

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_groups: list[KVCacheGroup], block_size: int, device: torch.device,
                 dtype: torch.dtype, seed: int = 0, attention_backend: str = "torch", max_num_seqs: int = 64,
                 max_seq_len: int | None = None, cuda_graphs: bool = False) -> None:
        """kv_groups: sized groups (kv_cache/spec.py); each layer's cache takes its group's block count and dtype."""
        self.model = model
        self.dtype = dtype
        self.rotaries = index_rotaries(model)
        self.device = device
        self.block_size = block_size
        self.ops = get_ops(attention_backend)
        self.sampler = Sampler(device, seed)
        self.requests = RequestStates()
        self.kv_groups = kv_groups
        self.num_kv_groups = len(kv_groups)
        layers = model.attention_layers()
        # zeros, not empty: padded block-table entries read block 0, and 0 * NaN garbage would poison softmax.
        # On CPU the zeros are fresh mappings, resident only once a block is written (runner/kv_alloc.py).
        self.kv_caches = []
        kv_dtype = dtype
        for gi, g in enumerate(kv_groups):
            kv_dtype = KV_DTYPES.get(g.spec.dtype, dtype)
            shape = (g.num_blocks, block_size, g.spec.num_kv_heads, g.spec.head_dim)
            for i in g.layer_ids:
                attn = layers[i]
                attn.kv_group = gi
                attn.k_cache = zeroed(shape, kv_dtype, device)
                attn.v_cache = zeroed(shape, kv_dtype, device)
                if g.spec.is_quantized:
                    attn.k_scale = zeroed(shape[:3], torch.float32, device)
                    attn.v_scale = zeroed(shape[:3], torch.float32, device)
                self.kv_caches.append((attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale))
        self.windows = [g.spec.sliding_window for g in kv_groups]  # per group, for the decode plans
        max_rows = max((g.num_blocks - 1) * block_size for g in kv_groups)
        # Small all-decode steps in one C call where the model qualifies (see runner/cpu_decode.py); on CUDA,
        # decode-only steps replay graphs captured over fixed buffers (runner/cuda_graphs.py).
        self.cpu_decoder = create_cpu_decoder(model, device, dtype, kv_dtype, block_size, max_rows, len(kv_groups))
        self.decode_graphs = None
        if cuda_graphs:
            self.decode_graphs = DecodeGraphs(model, self.ops, block_size, max_num_seqs, max_seq_len or max_rows,
                                              self.windows, device, dtype)
            self.decode_graphs.capture()

    @property
    def decode_backend(self) -> DecodeBackend | None:
        return self.cpu_decoder or self.decode_graphs

    def kv_cache_bytes(self) -> int:
        """Bytes of every KV tensor allocated (codes and scales), for the memory report."""
        return sum(t.numel() * t.element_size() for group in self.kv_caches for t in group if t is not None)

    def kv_cache_resident_bytes(self) -> int | None:
        """Bytes of the KV pool resident in RAM (CPU: the pages written so far); None off CPU."""
        if self.device.type != "cpu":
            return None
        return resident_bytes([t for group in self.kv_caches for t in group])

    def _tables(self, states: list[RequestState], gi: int) -> torch.Tensor:
        width = max(len(s.block_ids[gi]) for s in states)
        rows = [s.block_ids[gi] + [0] * (width - len(s.block_ids[gi])) for s in states]
        return to_device(rows, torch.int64, self.device)

    def prepare(self, seqs: list[ScheduledSeq]):
        """-> (input_ids, positions, metadata) for sequences in batch order (decodes first)."""
        states = [self.requests[s.request_id] for s in seqs]
        input_ids: list[int] = []
        positions: list[int] = []
        rows: list[int] = []  # cache row of each new token
        for s, st in zip(seqs, states):
            input_ids.extend(st.token_ids[s.start_pos:s.end_pos])
            positions.extend(range(s.start_pos, s.end_pos))  # a request's row r holds its position r
            rows.extend(range(s.start_pos, s.end_pos))
        dev = self.device
        rows_t = to_device(rows, torch.int64, dev)
        seq_idx = to_device([i for i, s in enumerate(seqs) for _ in range(s.num_new_tokens)], torch.int64, dev)
        nd = sum(1 for s in seqs if s.is_decode)
        prefills = seqs[nd:]
        decode_lens = [s.end_pos for s in seqs[:nd]]
        decode_seq_lens = to_device(decode_lens, torch.int64, dev)
        max_len = max(decode_lens, default=0)
        groups = []
        for gi, window in enumerate(self.windows):
            tables = self._tables(states, gi)
            slots = tables[seq_idx, rows_t // self.block_size] * self.block_size + rows_t % self.block_size
            plan = self.ops.plan_decode(tables[:nd], decode_seq_lens, max_len, self.block_size, window) if nd else None
            groups.append(KVGroupMetadata(slots, tables[:nd], tables[nd:], plan))
        positions_t = to_device(positions, torch.int64, dev)
        meta = AttentionMetadata(
            ops=self.ops, num_decode_tokens=nd, decode_seq_lens=decode_seq_lens, decode_max_seq_len=max_len,
            prefill_query_lens=[s.num_new_tokens for s in prefills], prefill_seq_lens=[s.end_pos for s in prefills],
            groups=groups, rope=rope_for_step(self.rotaries, positions_t, self.dtype))
        return to_device(input_ids, torch.int64, dev), positions_t, meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        self.requests.apply(sched)
        if sched.is_empty:
            return ModelOutput([])
        # Decodes first so attention can treat them as one batch; results go back in scheduler order.
        order = sorted(range(len(sched.seqs)), key=lambda i: not sched.seqs[i].is_decode)
        seqs = [sched.seqs[i] for i in order]
        if self._takes_fast_decode(seqs):
            return self._execute_fast_decode(sched.seqs)
        input_ids, positions, meta = self.prepare(seqs)
        hidden = self.model(input_ids, positions, meta)  # [num_tokens, hidden]

        # Rows needing logits: the last token of sampled sequences, every token of prompt-logprob chunks.
        rows: list[int] = []
        spans: list[tuple[int, int]] = []  # per seq: (first row in `rows`, count)
        offset = 0
        for s in seqs:
            if s.prompt_logprobs:
                spans.append((len(rows), s.num_new_tokens))
                rows.extend(range(offset, offset + s.num_new_tokens))
            elif s.sample:
                spans.append((len(rows), 1))
                rows.append(offset + s.num_new_tokens - 1)
            else:
                spans.append((len(rows), 0))
            offset += s.num_new_tokens
        results = [SeqResult([]) for _ in seqs]
        if rows:
            logits = self.model.compute_logits(hidden[to_device(rows, torch.int64, self.device)]).float()
            sample_idx = [i for i, s in enumerate(seqs) if s.sample]
            if sample_idx:
                last_rows = to_device([spans[i][0] + spans[i][1] - 1 for i in sample_idx], torch.int64, self.device)
                tokens, lps = self.sampler(logits[last_rows], [self.requests[seqs[i].request_id] for i in sample_idx])
                for i, t, lp in zip(sample_idx, tokens, lps):
                    results[i].token_ids, results[i].logprobs = [t], None if lp is None else [lp]
            for i, s in enumerate(seqs):
                if s.prompt_logprobs:
                    results[i].prompt_logprobs = self._prompt_logprobs(s, logits[spans[i][0]:spans[i][0] + spans[i][1]])
        out = [None] * len(seqs)
        for pos, i in enumerate(order):
            out[i] = results[pos]
        return ModelOutput(out)

    def _takes_fast_decode(self, seqs: list[ScheduledSeq]) -> bool:
        """Whether this step goes to the whole-step decode backend (C step on CPU, CUDA graph on GPU)."""
        return self.decode_backend is not None and len(seqs) <= self.decode_backend.max_batch and \
            all(s.is_decode and s.sample and not s.prompt_logprobs for s in seqs)

    def decode_batch(self, seqs: list[ScheduledSeq]) -> DecodeBatch:
        states = [self.requests[s.request_id] for s in seqs]
        return DecodeBatch.build([st.token_ids[s.start_pos] for s, st in zip(seqs, states)],
                                 [s.start_pos for s in seqs], [s.start_pos for s in seqs],
                                 [[st.block_ids[gi] for st in states] for gi in range(self.num_kv_groups)],
                                 self.block_size)

    def _execute_fast_decode(self, seqs: list[ScheduledSeq]) -> ModelOutput:
        batch = self.decode_batch(seqs)
        backend = self.decode_backend
        threads = getattr(backend, "host_threads", contextlib.nullcontext)
        with threads():
            logits = backend(batch).float()
            tokens, lps = self.sampler(logits, [self.requests[s.request_id] for s in seqs])
        return ModelOutput([SeqResult([t], None if lp is None else [lp]) for t, lp in zip(tokens, lps)])

    def _prompt_logprobs(self, s: ScheduledSeq, logits: torch.Tensor) -> list[dict]:
        # Row j predicts the token at position start_pos + j + 1; only prompt positions are scored here.
        st = self.requests[s.request_id]
        n = min(s.num_new_tokens, st.num_prompt_tokens - 1 - s.start_pos)
        if n <= 0:
            return []
        targets = to_device(st.token_ids[s.start_pos + 1:s.start_pos + 1 + n], torch.int64, self.device)
        return top_logprobs(logits[:n].log_softmax(-1), targets, st.params.prompt_logprobs)
