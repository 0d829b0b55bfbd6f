"""The two messages of a step: what the scheduler asks the runner to compute, and what comes back."""

from __future__ import annotations

from dataclasses import dataclass, field

from turboinfer.engine.request import Request


@dataclass
class ScheduledSeq:
    request: Request  # the runner reads token ids and sampling params from it, never writes it
    start_pos: int  # == request.num_computed_tokens at scheduling; first position computed this step
    num_new_tokens: int  # tokens computed this step: 1 for a decode, a chunk for a prefill
    block_ids: list[int]  # the request's block table, covering start_pos + num_new_tokens tokens
    sample: bool  # True when this chunk reaches the last known token, so a next token is drawn
    prompt_logprobs: bool  # True when logits of every prompt position in the chunk are wanted

    @property
    def end_pos(self) -> int:
        return self.start_pos + self.num_new_tokens


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq]  # decodes first, then prefills; the runner keeps this order
    num_batched_tokens: int  # sum of num_new_tokens, <= max_num_batched_tokens
    preempted_ids: list[str] = field(default_factory=list)  # requests whose blocks were taken this step

    @property
    def is_empty(self) -> bool:
        return not self.seqs


@dataclass
class SeqResult:
    """Per scheduled sequence, in SchedulerOutput order."""

    token_id: int | None  # sampled token; None when the chunk did not reach the end of the prompt
    logprobs: dict[int, tuple[float, int]] | None = None  # sampled + top-k: id -> (logprob, rank)
    prompt_logprobs: list[dict[int, tuple[float, int]]] | None = None  # for positions start+1 .. end of chunk


@dataclass
class ModelOutput:
    results: list[SeqResult]
