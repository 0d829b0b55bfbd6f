"""Executes one scheduled step: builds the flat token batch and its attention metadata, runs the model,
computes logits only for the rows that need them, samples."""

from __future__ import annotations

import torch

from turboinfer.engine.batch import ModelOutput, ScheduledSeq, SchedulerOutput, SeqResult
from turboinfer.kernels import get_ops
from turboinfer.runner.attention_metadata import AttentionMetadata
from turboinfer.runner.cpu_decode import MAX_BATCH, create_cpu_decoder
from turboinfer.runner.cuda_graphs import DecodeGraphs
from turboinfer.runner.kv_alloc import resident_bytes, zeroed
from turboinfer.runner.sampler import Sampler, top_logprobs


class ModelRunner:
    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int, device: torch.device,
                 dtype: torch.dtype, kv_dtype: torch.dtype | None = None, seed: int = 0,
                 attention_backend: str = "torch", max_num_seqs: int = 64, max_seq_len: int | None = None,
                 cuda_graphs: bool = False) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.ops = get_ops(attention_backend)
        self.sampler = Sampler(device, seed)
        arch = model.arch
        shape = (num_blocks, block_size, arch.num_kv_heads, arch.head_dim)
        kv_dtype = kv_dtype or dtype
        quantized = kv_dtype in (torch.int8, torch.float8_e4m3fn)
        # zeros, not empty: padded block-table entries read block 0, and 0 * NaN garbage would poison softmax.
        # On CPU the zeros are fresh mappings, resident only once a block is written (runner/kv_alloc.py).
        self.kv_caches = []
        for attn in model.attention_layers():
            attn.k_cache = zeroed(shape, kv_dtype, device)
            attn.v_cache = zeroed(shape, kv_dtype, device)
            if quantized:
                attn.k_scale = zeroed(shape[:3], torch.float32, device)
                attn.v_scale = zeroed(shape[:3], torch.float32, device)
            self.kv_caches.append((attn.k_cache, attn.v_cache, attn.k_scale, attn.v_scale))
        # Small all-decode steps in one C call where the model qualifies (see runner/cpu_decode.py).
        self.cpu_decoder = create_cpu_decoder(model, device, dtype, kv_dtype, block_size,
                                              (num_blocks - 1) * block_size)
        # On CUDA, decode-only steps replay graphs captured over fixed buffers (runner/cuda_graphs.py).
        self.decode_graphs = None
        if cuda_graphs:
            self.decode_graphs = DecodeGraphs(model, self.ops, block_size, max_num_seqs,
                                              max_seq_len or (num_blocks - 1) * block_size, device)
            self.decode_graphs.capture()

    def kv_cache_bytes(self) -> int:
        """Bytes of every KV tensor allocated (codes and scales), for the memory report."""
        return sum(t.numel() * t.element_size() for group in self.kv_caches for t in group if t is not None)

    def kv_cache_resident_bytes(self) -> int | None:
        """Bytes of the KV pool resident in RAM (CPU: the pages written so far); None off CPU."""
        if self.device.type != "cpu":
            return None
        return resident_bytes([t for group in self.kv_caches for t in group])

    def _block_table(self, seqs: list[ScheduledSeq]) -> torch.Tensor:
        width = max(len(s.block_ids) for s in seqs)
        rows = [s.block_ids + [0] * (width - len(s.block_ids)) for s in seqs]
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _prepare(self, seqs: list[ScheduledSeq]):
        input_ids: list[int] = []
        positions: list[int] = []
        for s in seqs:
            input_ids.extend(s.request.all_token_ids[s.start_pos:s.end_pos])
            positions.extend(range(s.start_pos, s.end_pos))
        dev = self.device
        input_ids_t = torch.tensor(input_ids, dtype=torch.int64, device=dev)
        positions_t = torch.tensor(positions, dtype=torch.int64, device=dev)
        seq_idx = torch.repeat_interleave(torch.arange(len(seqs), device=dev),
                                          torch.tensor([s.num_new_tokens for s in seqs], device=dev))
        tables = self._block_table(seqs)
        slot_mapping = tables[seq_idx, positions_t // self.block_size] * self.block_size + positions_t % self.block_size

        decodes = [s for s in seqs if s.num_new_tokens == 1 and s.start_pos > 0]
        nd = len(decodes)
        prefills = seqs[nd:]
        meta = AttentionMetadata(
            ops=self.ops,
            slot_mapping=slot_mapping,
            num_decode_tokens=nd,
            decode_seq_lens=torch.tensor([s.end_pos for s in decodes], dtype=torch.int64, device=dev),
            decode_max_seq_len=max((s.end_pos for s in decodes), default=0),
            decode_block_tables=tables[:nd],
            prefill_query_lens=[s.num_new_tokens for s in prefills],
            prefill_seq_lens=[s.end_pos for s in prefills],
            prefill_block_tables=tables[nd:],
        )
        return input_ids_t, positions_t, meta

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        # Decodes first so attention can treat them as one batch; results go back in scheduler order.
        order = sorted(range(len(sched.seqs)),
                       key=lambda i: not (sched.seqs[i].num_new_tokens == 1 and sched.seqs[i].start_pos > 0))
        seqs = [sched.seqs[i] for i in order]
        fast = self._fast_decode(seqs)
        if fast is not None:
            return self._execute_fast_decode(sched.seqs, fast)
        input_ids, positions, meta = self._prepare(seqs)
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
        results = [SeqResult(None) for _ in seqs]
        if rows:
            logits = self.model.compute_logits(hidden[torch.tensor(rows, device=self.device)]).float()
            sample_idx = [i for i, s in enumerate(seqs) if s.sample]
            if sample_idx:
                last_rows = torch.tensor([spans[i][0] + spans[i][1] - 1 for i in sample_idx], device=self.device)
                tokens, lps = self.sampler(logits[last_rows], [seqs[i].request for i in sample_idx])
                for i, t, lp in zip(sample_idx, tokens, lps):
                    results[i].token_id, results[i].logprobs = t, lp
            for i, s in enumerate(seqs):
                if s.prompt_logprobs:
                    results[i].prompt_logprobs = self._prompt_logprobs(s, logits[spans[i][0]:spans[i][0] + spans[i][1]])
        out = [None] * len(seqs)
        for pos, i in enumerate(order):
            out[i] = results[pos]
        return ModelOutput(out)

    def _fast_decode(self, seqs: list[ScheduledSeq]):
        """The whole-step decode path for this step (C step on CPU, CUDA graph on GPU), or None."""
        if not all(s.num_new_tokens == 1 and s.start_pos > 0 and s.sample and not s.prompt_logprobs for s in seqs):
            return None
        if self.cpu_decoder is not None and len(seqs) <= MAX_BATCH:
            return self.cpu_decoder
        if self.decode_graphs is not None and len(seqs) <= self.decode_graphs.max_batch:
            return self.decode_graphs.run
        return None

    def _execute_fast_decode(self, seqs: list[ScheduledSeq], decode) -> ModelOutput:
        args = ([s.request.all_token_ids[s.start_pos] for s in seqs], [s.start_pos for s in seqs],
                [s.block_ids for s in seqs])
        if decode is not self.cpu_decoder:
            logits = decode(*args).float()
            tokens, lps = self.sampler(logits, [s.request for s in seqs])
        else:
            # The C step has its own threads. The small torch ops around it (embedding rows, sampling) run on
            # one thread: on more, torch's OpenMP workers would spin after each op on the cores the next C step
            # needs.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                logits = decode(*args, nthreads=threads)
                tokens, lps = self.sampler(logits, [s.request for s in seqs])
            finally:
                torch.set_num_threads(threads)
        return ModelOutput([SeqResult(t, logprobs=lp) for t, lp in zip(tokens, lps)])

    def _prompt_logprobs(self, s: ScheduledSeq, logits: torch.Tensor) -> list[dict]:
        # Row j predicts the token at position start_pos + j + 1; only prompt positions are scored here.
        req = s.request
        n = min(s.num_new_tokens, req.num_prompt_tokens - 1 - s.start_pos)
        if n <= 0:
            return []
        targets = torch.tensor(req.prompt_token_ids[s.start_pos + 1:s.start_pos + 1 + n], device=self.device)
        return top_logprobs(logits[:n].log_softmax(-1), targets, req.params.prompt_logprobs)
