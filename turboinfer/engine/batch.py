"""The step contract: what the scheduler asks a worker to compute, and what comes back.

Plain, picklable data only (ints, lists, SamplingParams), never the engine's live Request objects, so a worker
can live in another process (tensor / pipeline parallel ranks) and the runner keeps its own per-request state
(token history, seeded generator) instead of reaching into the engine's. A request is sent in full the first
time a worker sees it (and again when it resumes after preemption); after that only what changed is sent: the
tokens appended since the last step and the blocks added to its tables. vLLM v1's `SchedulerOutput` works the
same way, for the same reason: a long-running request's token list is never re-sent.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from turboinfer.sampling_params import SamplingParams


@dataclass
class NewRequestData:
    """A request the worker has no live state for (new, or resumed after preemption)."""

    request_id: str
    token_ids: list[int]  # prompt + every output token so far: what the cache must end up holding
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt (prompt logprobs, penalties)
    params: SamplingParams
    eos_token_ids: frozenset[int]  # masked while fewer than min_tokens are out (ignored with ignore_eos)
    block_ids: list[list[int]]  # per KV cache group: the whole block table (prefix hits and new blocks)


@dataclass
class CachedRequestData:
    """A request the worker already holds: only the difference since it last saw it."""

    request_id: str
    new_token_ids: list[int]  # tokens appended since the last step (the one sampled then)
    new_block_ids: list[list[int]]  # per KV cache group: ids appended to its block table


@dataclass
class ScheduledSeq:
    """One sequence's share of this step, in batch order."""

    request_id: str
    start_pos: int  # cache rows already computed; the first row computed this step
    num_new_tokens: int  # rows computed this step: 1 for a decode, a chunk for a prefill
    sample: bool  # True when this chunk reaches the last known token, so next tokens are drawn
    prompt_logprobs: bool  # True when logits of every prompt position in the chunk are wanted
    draft_token_ids: list[int] = field(default_factory=list)  # proposed tokens to verify after the last one
    num_lookahead_slots: int = 0  # cache rows reserved past the new tokens (for drafts)

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens

    @property
    def is_decode(self) -> bool:
        """One new token at the end of a request that has context: the batched single-query path."""
        return self.num_new_tokens == 1 and self.start_pos > 0 and not self.draft_token_ids


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # decodes first, then prefills; results come back in this order
    new_requests: list[NewRequestData]  # every scheduled request the worker has no state for
    cached_requests: list[CachedRequestData]  # every other scheduled request
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens
    preempted_ids: list[str] = field(default_factory=list)  # blocks taken this step; the worker drops its tables
    finished_ids: list[str] = field(default_factory=list)  # done or aborted since the last step: drop all state

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SeqResult:
    """Per scheduled sequence, in SchedulerOutput.seqs order."""

    token_ids: list[int]  # accepted tokens, in order: one per sampled sequence today, none for a mid-prompt chunk
    logprobs: list[dict[int, tuple[float, int]]] | None = None  # per accepted token: id -> (logprob, rank)
    prompt_logprobs: list[dict[int, tuple[float, int]]] | None = None  # for positions start+1 .. end of chunk


@dataclass
class ModelOutput:
    results: list[SeqResult]
