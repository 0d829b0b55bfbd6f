"""One sequence being generated, as the engine sees it. The scheduler moves it between queues; workers never see
this object, only the plain data of the step contract (engine/batch.py)."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from turboinfer.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # waiting again after its blocks were taken; recomputed on resume
    FINISHED = "finished"


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int]  # model EOS ids; ignored when params.ignore_eos
    max_total_tokens: int  # prompt + output never exceeds this (max_model_len)
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(init=False)  # prompt + output: what the KV cache must hold
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_sent_tokens: int = 0  # of all_token_ids, how many the worker holds (0: it has no tables for us)
    num_cached_tokens: int = 0  # of the prompt, how many came from the prefix cache at admission
    status: Status = Status.WAITING
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # From the workers' results; plain Python values so the engine stays torch-free.
    output_logprobs: list[dict[int, tuple[float, int]]] = field(default_factory=list)  # per token: id->(lp, rank)
    prompt_logprobs: list[dict[int, tuple[float, int]] | None] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    first_token_time: float | None = None
    num_preemptions: int = 0
    detok: Any = None  # incremental detokenizer state (engine/detokenizer.py)
    parent_id: str | None = None  # for n > 1: the user's request id; children are "<id>#<i>"
    index: int = 0  # completion index within the parent

    def __post_init__(self) -> None:
        self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def check_stop_token(self) -> None:
        """Finish on EOS / stop ids / length after the last appended token. Stop strings are checked by the
        detokenizer, which sees text."""
        p = self.params
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= p.min_tokens:
            if not p.ignore_eos and last in self.eos_token_ids:
                self.finish("stop")
                return
            if last in p.stop_token_ids:
                self.finish("stop", last)
                return
        if (p.max_tokens is not None and self.num_output_tokens >= p.max_tokens) or \
                self.num_tokens >= self.max_total_tokens:
            self.finish("length")

    def finish(self, reason: str, stop_reason: int | str | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
