"""Per-request sampling parameters, shaped like vLLM's so users can switch by changing the import."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from turboinfer.errors import InvalidRequestError


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; children share the prompt's KV blocks through the prefix cache
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # >1 discourages tokens seen in prompt or output (CTRL paper)
    presence_penalty: float = 0.0  # OpenAI semantics: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI semantics: subtract per occurrence in the output
    seed: int | None = None  # same seed, same tokens, alone or batched
    max_tokens: int | None = 16  # None: until the context is full
    min_tokens: int = 0  # EOS and stop ids are masked until this many tokens exist
    stop: str | list[str] | None = None  # text that ends the completion; not included in the output
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # return the sampled token's logprob plus this many top alternatives
    prompt_logprobs: int | None = None  # logprob of every prompt token (perplexity), plus top alternatives
    skip_special_tokens: bool = True
    detokenize: bool = True
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.stop_list = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        def bad(name: str, why: str) -> InvalidRequestError:
            return InvalidRequestError(f"{name} {why}, got {getattr(self, name)!r}", param=name)

        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1 (off), 0 (off) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise bad("min_tokens", "must be in [0, max_tokens]")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or not 0 <= v <= 20):
                raise bad(name, "must be an integer in [0, 20]")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer")
        if any(not s for s in self.stop_list):
            raise InvalidRequestError("stop strings must be non-empty", param="stop")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


# `turboinfer generate` and `chat` start from an interactive preset (longer replies, a little less randomness, as
# Ollama's defaults do) instead of the API's; every other flag defaults to the field's own value. Kept here so that
# every sampling default lives in this file.
CLI_DEFAULTS = {"max_tokens": 256, "temperature": 0.7, "top_p": 0.9}


def cli_default(name: str):
    """The default the CLI uses for a sampling flag it was not given (its preset, else the field's)."""
    if name in CLI_DEFAULTS:
        return CLI_DEFAULTS[name]
    f = next(f for f in fields(SamplingParams) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()
