"""What `LLM.generate` returns; field names follow vLLM's RequestOutput / CompletionOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token under the model's raw distribution
    decoded_token: str | None = None


# One position: {token_id: Logprob} holding the chosen token and the requested top alternatives.
PositionLogprobs = dict[int, Logprob]


@dataclass
class CompletionOutput:
    index: int  # which of the n completions of the prompt
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[PositionLogprobs] | None
    finish_reason: str | None  # "stop" (EOS, stop string or stop id), "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it; None for EOS / length
    delta: str = ""  # text added since the previous RequestOutput of this request (for streaming)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[PositionLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival, first-token and finish times (time.monotonic)
