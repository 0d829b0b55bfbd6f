"""Request bodies of the OpenAI-compatible API, and its error shape.

Models are strict (a string is not a number, 1 is not true) and forbid unknown fields, so a typo or a
parameter from a newer API version gets a 400 that names it instead of being dropped. Parameters that
OpenAI defines but this server does not implement are declared (typed `Any`) only so that
`unsupported()` can name them in a 400 when they are set to anything but their no-op value."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class APIError(Exception):
    """An error the client caused (or a 5xx it should retry), rendered as OpenAI's error object."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class StrictModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may spell lone surrogates ("\ud800"); they cannot be tokenized or written back as UTF-8.
        _check_unicode(data)
        return data


def _check_unicode(value: Any, depth: int = 0) -> None:
    if depth > 32:
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_unicode(k, depth + 1)
            _check_unicode(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _check_unicode(v, depth + 1)


class StreamOptions(StrictModel):
    include_usage: bool | None = None


class SamplingFields(StrictModel):
    """What both endpoints accept. Bounds are OpenAI's where it documents them."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    user: str | None = None  # an end-user id for abuse monitoring; accepted, nothing to do with it here
    # Extensions (vLLM's names).
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=2.0)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stop_token_ids: list[int] | None = None
    # OpenAI parameters this server does not implement (see unsupported()).
    logit_bias: Any = None

    def unsupported(self) -> list[str]:
        bad = []
        if self.logit_bias not in (None, {}):
            bad.append("logit_bias")
        return bad


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    suffix: Any = None
    best_of: Any = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        if self.suffix not in (None, ""):
            bad.append("suffix")
        if self.best_of is not None and self.best_of != (self.n or 1):
            bad.append("best_of")
        return bad


class ChatMessage(StrictModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]  # a string, or parts: only {"type": "text", "text": ...} is served


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: bool | None = None  # means nothing without tools, which are refused
    response_format: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None

    def unsupported(self) -> list[str]:
        bad = super().unsupported()
        checks = {
            "tools": self.tools in (None, []),
            "tool_choice": self.tool_choice in (None, "none"),
            "functions": self.functions in (None, []),
            "function_call": self.function_call in (None, "none"),
            "response_format": self.response_format is None or self.response_format == {"type": "text"},
            "audio": self.audio is None,
            "modalities": self.modalities in (None, ["text"]),
            "prediction": self.prediction is None,
            "reasoning_effort": self.reasoning_effort is None,
            "web_search_options": self.web_search_options is None,
            "metadata": self.metadata in (None, {}),
            "store": self.store in (None, False),
            "service_tier": self.service_tier in (None, "auto", "default"),
        }
        return bad + [name for name, ok in checks.items() if not ok]

    def text_messages(self) -> list[dict[str, str]]:
        """Messages as the chat template wants them: role + one string; "developer" is the newer "system"."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    where = f"messages[{i}].content[{j}]"
                    kind = part.get("type")
                    if kind != "text":
                        raise APIError(f"{where}: content parts of type {kind!r} are not supported; only "
                                       "'text' parts are", param=where + ".type", code="unsupported_parameter")
                    if set(part) != {"type", "text"} or not isinstance(part["text"], str):
                        raise APIError(f"{where}: a text part is exactly {{\"type\": \"text\", \"text\": <string>}}",
                                       param=where)
                    texts.append(part["text"])
                content = "\n".join(texts)
            out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        return out
