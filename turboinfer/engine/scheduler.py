"""Continuous batching over a per-step token budget (no torch).

Each step walks the running requests first (decodes and unfinished prefill chunks), then admits waiting
ones while tokens, sequence slots and KV blocks last. A request is simply "num_computed_tokens behind
its token list"; a decode is the case where it is one behind. When blocks run out, the newest running
request is preempted: its blocks go back to the pool (full ones stay findable in the prefix cache) and it
is recomputed later from its prompt plus what it has generated so far, so its output does not change.
"""

from __future__ import annotations

from collections import deque

from turboinfer.engine.batch import CachedRequestData, ModelOutput, NewRequestData, ScheduledSeq, SchedulerOutput
from turboinfer.engine.request import Request, Status
from turboinfer.kv_cache.manager import KVCacheManager


class Scheduler:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self._finished_ids: list[str] = []  # finished or aborted since the last schedule(): workers drop them

    def add(self, req: Request) -> None:
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def abort(self, request_id: str) -> Request | None:
        req = self.requests.get(request_id)
        if req is None or req.is_finished:
            return None
        req.finish("abort")
        self._release(req)
        return req

    def _release(self, req: Request) -> None:
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.request_id)
        self.requests.pop(req.request_id, None)
        if req.num_sent_tokens or req.num_preemptions:  # a worker holds state for it
            self._finished_ids.append(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.status = Status.PREEMPTED
        req.num_computed_tokens = 0
        req.num_sent_tokens = 0  # resent in full on resume, with its new block tables
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _wants_prompt_logprobs(self, req: Request, start: int) -> bool:
        return req.params.prompt_logprobs is not None and start < req.num_prompt_tokens \
            and len(req.prompt_logprobs) < req.num_prompt_tokens

    def _chunk(self, req: Request, budget: int, alone: bool) -> int:
        """Tokens to compute for `req` this step, 0 if it must wait."""
        num_new = req.num_tokens - req.num_computed_tokens
        if num_new <= budget:
            return num_new
        if self.enable_chunked_prefill:
            return budget
        return num_new if alone else 0  # unchunked: a long prompt runs whole, in a step of its own

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        seqs: list[ScheduledSeq] = []
        new_reqs: list[NewRequestData] = []
        cached_reqs: list[CachedRequestData] = []
        preempted: list[str] = []

        def emit(req: Request, num_new: int, new_block_ids: list[list[int]]) -> None:
            start = req.num_computed_tokens
            if req.num_sent_tokens == 0:
                new_reqs.append(NewRequestData(req.request_id, list(req.all_token_ids), req.num_prompt_tokens,
                                               req.params, req.eos_token_ids,
                                               [list(t) for t in self.kv.block_tables(req.request_id)]))
            else:
                cached_reqs.append(CachedRequestData(req.request_id, req.all_token_ids[req.num_sent_tokens:],
                                                     new_block_ids))
            req.num_sent_tokens = req.num_tokens
            seqs.append(ScheduledSeq(req.request_id, start, num_new, sample=start + num_new == req.num_tokens,
                                     prompt_logprobs=self._wants_prompt_logprobs(req, start)))

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            num_new = self._chunk(req, budget, alone=not seqs)
            if num_new == 0:
                i += 1
                continue
            while (new_blocks := self.kv.allocate_slots(req.request_id, req.num_computed_tokens, num_new)) is None:
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                emit(req, num_new, new_blocks)
                budget -= num_new
                i += 1

        # Admit waiting requests, oldest (or most recently preempted) first; none when we just preempted.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            req = self.waiting[0]
            if req.num_computed_tokens == 0 and req.params.prompt_logprobs is None:
                cached = self.kv.get_computed_blocks(req.request_id, req.all_token_ids, req.num_tokens - 1)
                req.num_computed_tokens = cached
                if req.status == Status.WAITING:
                    req.num_cached_tokens = cached
            num_new = self._chunk(req, budget, alone=not seqs)
            new_blocks = None if num_new == 0 else \
                self.kv.allocate_slots(req.request_id, req.num_computed_tokens, num_new)
            if new_blocks is None:
                self.kv.free(req.request_id)  # drop the prefix-cache references until it can really start
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            req.status = Status.RUNNING
            self.running.append(req)
            emit(req, num_new, new_blocks)
            budget -= num_new

        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(seqs, new_reqs, cached_reqs, self.max_num_batched_tokens - budget, preempted,
                               finished)

    def update(self, sched: SchedulerOutput, out: ModelOutput) -> list[Request]:
        """Apply a step's results: advance computed counts, append sampled tokens, finish, free blocks."""
        touched = []
        for seq, res in zip(sched.seqs, out.results):
            req = self.requests.get(seq.request_id)
            if req is None or req.is_finished:  # aborted while the step ran
                continue
            req.num_computed_tokens = seq.end_pos
            # Every token in all_token_ids is final (drafts never enter it), so computed rows may be published.
            self.kv.cache_full_blocks(req.request_id, req.all_token_ids, req.num_computed_tokens)
            if res.prompt_logprobs is not None:
                if not req.prompt_logprobs:
                    req.prompt_logprobs.append(None)  # the first prompt token has no context to score it
                req.prompt_logprobs.extend(res.prompt_logprobs[: req.num_prompt_tokens - len(req.prompt_logprobs)])
            for j, token_id in enumerate(res.token_ids):
                req.append_token(token_id)
                if res.logprobs is not None:
                    req.output_logprobs.append(res.logprobs[j])
                    req.cumulative_logprob += res.logprobs[j][token_id][0]
                req.check_stop_token()
                if req.is_finished:
                    self._release(req)
                    break
            touched.append(req)
        return touched

    def finish(self, req: Request, reason: str, stop_reason: int | str | None = None) -> None:
        """Finish a request from outside a step (stop string seen by the detokenizer)."""
        req.finish(reason, stop_reason)
        self._release(req)
