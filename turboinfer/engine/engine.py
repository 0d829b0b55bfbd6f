"""The engine: requests in, RequestOutputs out. `step()` is schedule -> execute -> update."""

from __future__ import annotations

import itertools
import time

from turboinfer.config import EngineConfig
from turboinfer.engine.detokenizer import Detokenizer
from turboinfer.engine.executor import EngineInfo, Executor, InProcessExecutor
from turboinfer.engine.request import Request
from turboinfer.engine.scheduler import Scheduler
from turboinfer.errors import InvalidRequestError
from turboinfer.kv_cache.manager import KVCacheManager
from turboinfer.outputs import CompletionOutput, Logprob, RequestOutput
from turboinfer.sampling_params import SamplingParams


class Engine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        """executor: who runs the steps (default: one worker in this process, built from config)."""
        self.config = config
        self.executor = executor if executor is not None else InProcessExecutor(config)
        self.info: EngineInfo = self.executor.info
        self.tokenizer = self.executor.tokenizer
        self.max_model_len = self.info.max_model_len
        self.kv = KVCacheManager(list(self.info.kv_cache_groups), self.info.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.detokenizer = Detokenizer(self.tokenizer)
        self._children: dict[str, list[Request]] = {}  # user request id -> its n completions
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """The prompt's token ids, checked: every request passes here, whichever door it came in by."""
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            ids = list(prompt)
            vocab = self.info.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})",
                                          param="prompt")
        else:
            raise InvalidRequestError("a prompt must be a string or a list of token ids", param="prompt")
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        if len(ids) >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {len(ids)} tokens but this model's maximum context length (max_model_len) is "
                f"{self.max_model_len}, which must also leave room for at least one generated token; shorten the "
                f"prompt or raise --max-model-len",
                param="prompt", code="context_length_exceeded")
        return ids

    def check_params(self, params: SamplingParams) -> None:
        """Sampling values and stop ids, checked against this model."""
        params.validate()
        vocab = self.info.vocab_size
        bad = [t for t in params.stop_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"stop_token_ids entry {bad[0]} is outside the vocabulary [0, {vocab})",
                                      param="stop_token_ids")

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, prompt_text: str | None = None) -> str:
        """Queue a prompt (text or token ids). prompt_text: the text the ids came from, returned in outputs."""
        params = params or SamplingParams()
        self.check_params(params)
        ids = self.tokenize_prompt(prompt)
        if isinstance(prompt, str):
            prompt_text = prompt
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._children:
            raise InvalidRequestError(f"request id {request_id!r} is already in use", param="request_id")
        reqs = []
        eos = self.info.eos_token_ids
        for i in range(params.n):
            p = params
            if params.n > 1:  # each child is its own sequence; seeded children get distinct seeds
                p = SamplingParams(**{**_fields(params), "n": 1,
                                      "seed": None if params.seed is None else params.seed + i})
            reqs.append(Request(
                request_id=request_id if params.n == 1 else f"{request_id}#{i}",
                prompt_token_ids=ids, params=p, eos_token_ids=eos, max_total_tokens=self.max_model_len,
                prompt=prompt_text, parent_id=request_id, index=i))
        self._children[request_id] = reqs
        for r in reqs:
            self.scheduler.add(r)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its KV blocks (a client went away)."""
        for r in self._children.pop(request_id, []):
            self.scheduler.abort(r.request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        model_out = self.executor.execute(sched)
        touched = self.scheduler.update(sched, model_out)
        now = time.monotonic()
        parents = {}
        for req in touched:
            if req.first_token_time is None and req.output_token_ids:
                req.first_token_time = now
            stop = self.detokenizer.update(req)
            if stop is not None and not req.is_finished:
                self.scheduler.finish(req, "stop", stop)
            elif stop is not None:
                req.finish_reason, req.stop_reason = "stop", stop
            parents[req.parent_id] = None
        return [self._output(pid) for pid in parents if pid in self._children]

    def _output(self, parent_id: str) -> RequestOutput:
        reqs = self._children[parent_id]
        finished = all(r.is_finished for r in reqs)
        if finished:
            del self._children[parent_id]
        first = reqs[0]
        tok = self.tokenizer
        outs = []
        for r in reqs:
            lps = None
            if r.params.logprobs is not None:
                lps = [{t: Logprob(v[0], v[1], tok.decode([t], skip_special_tokens=False)) for t, v in d.items()}
                       for d in r.output_logprobs]
            outs.append(CompletionOutput(
                index=r.index, text=r.detok.text if r.detok else "", token_ids=list(r.output_token_ids),
                cumulative_logprob=r.cumulative_logprob if r.params.logprobs is not None else None,
                logprobs=lps, finish_reason=r.finish_reason, stop_reason=r.stop_reason,
                delta=Detokenizer.take_delta(r)))
        prompt_lps = None
        if first.params.prompt_logprobs is not None and len(first.prompt_logprobs) == first.num_prompt_tokens:
            prompt_lps = [None if d is None else
                          {t: Logprob(v[0], v[1], tok.decode([t], skip_special_tokens=False)) for t, v in d.items()}
                          for d in first.prompt_logprobs]
        return RequestOutput(
            request_id=parent_id, prompt=first.prompt, prompt_token_ids=first.prompt_token_ids,
            prompt_logprobs=prompt_lps, outputs=outs, finished=finished,
            num_cached_tokens=first.num_cached_tokens,
            metrics={"arrival_time": first.arrival_time, "first_token_time": first.first_token_time,
                     "finished_time": time.monotonic() if finished else None})

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (benchmarks that must pay for each prefill)."""
        self.kv.reset_prefix_cache()

    # ---- introspection (metrics, tests) -----------------------------------------------------------
    def stats(self) -> dict:
        kv = self.kv
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "kv_usage": kv.usage(), "num_free_blocks": kv.num_free_blocks,
                "num_blocks": kv.num_usable_blocks, "prefix_cache_hit_rate": kv.hit_rate(),
                "num_preemptions": self.scheduler.num_preemptions}


def _fields(params: SamplingParams) -> dict:
    from dataclasses import fields

    return {f.name: getattr(params, f.name) for f in fields(params) if f.init}
