"""OpenAI completions and chat completions over the AsyncEngine: request -> token ids + SamplingParams,
engine outputs -> response JSON or an SSE stream of chunks.

Everything a request can get wrong is checked before any of its prompts reaches the engine, so a 400
never leaves half a request running."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from turboinfer.engine.async_engine import EngineShutdownError, EngineStepError
from turboinfer.errors import InvalidRequestError
from turboinfer.outputs import RequestOutput
from turboinfer.sampling_params import SamplingParams
from turboinfer.server.formats import ChatFormat, CompletionFormat, ResponseFormat
from turboinfer.server.metrics import ServerMetrics
from turboinfer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest, SamplingFields

# /v1/completions defaults to SamplingParams' max_tokens (16, OpenAI's default too); chat to "what fits"
COMPLETION_DEFAULT_MAX_TOKENS = SamplingParams().max_tokens


def json_response(body: dict, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status_code=status, headers=headers, media_type="application/json")


def dumps(body: Any) -> bytes:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "replace")


# Request fields passed to SamplingParams under the same name when the client sends them.
SAMPLING_FIELDS = ("n", "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "seed", "min_tokens", "stop", "stop_token_ids")


class OpenAIServing:
    def __init__(self, async_engine, served_model_name: str, metrics: ServerMetrics, *,
                 model_aliases: tuple[str, ...] = (), max_waiting: int | None = None,
                 max_tokens_limit: int | None = None) -> None:
        self.engine = async_engine
        self.model_name = served_model_name
        self.accepted_names = {served_model_name, *model_aliases}
        self.metrics = metrics
        self.max_waiting = max_waiting
        self.max_tokens_limit = max_tokens_limit
        self.tokenizer = async_engine.tokenizer
        self.max_model_len = async_engine.max_model_len

    # ---- endpoints ----------------------------------------------------------------------------------
    async def completions(self, req: CompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check_common(req)
        prompts = req.prompt if isinstance(req.prompt, list) and req.prompt and \
            not isinstance(req.prompt[0], int) else [req.prompt]
        if not prompts:
            raise APIError("prompt must not be empty", param="prompt")
        token_ids = []
        for i, p in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{i}]"
            token_ids.append(self._tokenize(p, param, add_special_tokens=True))
        logprobs = req.logprobs
        params = [self._sampling(req, ids, req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, logprobs,
                                 prompt_logprobs=logprobs if req.echo and logprobs is not None else None)
                  for ids in token_ids]
        rid = f"cmpl-{uuid.uuid4().hex}"
        streams = await self._start(rid, token_ids, params)
        echo = [p if isinstance(p, str) else self.tokenizer.decode(p) for p in prompts] if req.echo else None
        fmt = CompletionFormat(rid, self.model_name, params[0].n, echo, logprobs)
        return await self._respond(req, raw, streams, fmt, arrival)

    async def chat(self, req: ChatCompletionRequest, raw: Request) -> Response:
        arrival = time.monotonic()
        self._check_common(req)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError("top_logprobs needs logprobs set to true", param="top_logprobs")
        if req.max_tokens is not None and req.max_completion_tokens is not None and \
                req.max_tokens != req.max_completion_tokens:
            raise APIError("max_tokens and max_completion_tokens disagree; send one of them",
                           param="max_completion_tokens")
        messages = req.text_messages()
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except InvalidRequestError as e:
            raise APIError(str(e), param="messages") from None
        except Exception as e:  # noqa: BLE001 -- a template that chokes on this conversation is a 400
            raise APIError(f"the chat template cannot render these messages: {e}", param="messages") from None
        ids = self._tokenize(text, "messages", add_special_tokens=False)  # the template writes BOS itself
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = self._sampling(req, ids, max_tokens, None, logprobs, None,
                                param="max_completion_tokens" if req.max_completion_tokens else "max_tokens")
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        streams = await self._start(rid, [ids], [params])
        fmt = ChatFormat(rid, self.model_name, params.n, logprobs)
        return await self._respond(req, raw, streams, fmt, arrival)

    async def _respond(self, req: SamplingFields, raw: Request, streams: list, fmt: ResponseFormat,
                       arrival: float) -> Response:
        observed = [self.metrics.observe(s, arrival) for s in streams]
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _SSEResponse(self._stream(observed, fmt, include_usage), streams)
        try:
            finals = await _collect(observed, raw)
        finally:
            for s in streams:
                await s.aclose()
        return json_response(fmt.response(finals))

    # ---- checks and translation ------------------------------------------------------------------
    def _check_common(self, req: SamplingFields) -> None:
        bad = req.unsupported()
        if bad:
            raise APIError(f"unsupported parameter(s): {', '.join(bad)}; this server does not implement "
                           f"{'it' if len(bad) == 1 else 'them'}", param=bad[0], code="unsupported_parameter")
        if req.model not in self.accepted_names:
            raise APIError(f"the model {req.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        if req.stream_options is not None and not req.stream:
            raise APIError("stream_options is only allowed when stream is true", param="stream_options")

    def _tokenize(self, prompt: str | list[int], param: str, add_special_tokens: bool) -> list[int]:
        """Token ids of a prompt, checked by the engine (the one place that validates prompts); its errors are
        reported against this request's field name."""
        ids = prompt
        if isinstance(prompt, str):
            try:
                ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
            except Exception as e:  # noqa: BLE001 -- text the tokenizer refuses is the client's to fix
                raise APIError(f"{param} cannot be tokenized: {e}", param=param) from None
        try:
            return self.engine.tokenize_prompt(list(ids))
        except InvalidRequestError as e:
            raise APIError(f"{param}: {e}", param=param, code=e.code) from None

    def _sampling(self, req: SamplingFields, ids: list[int], max_tokens: int | None, default: int | None,
                  logprobs: int | None, prompt_logprobs: int | None, param: str = "max_tokens") -> SamplingParams:
        room = self.max_model_len - len(ids)
        limit = self.max_tokens_limit
        if max_tokens is None:  # not asked for: the default, shrunk to what fits and to the server's limit
            max_tokens = min(x for x in (default, room, limit) if x is not None)
        elif limit is not None and max_tokens > limit:
            raise APIError(f"{param} is {max_tokens} but this server generates at most {limit} tokens per "
                           "request", param=param)
        elif max_tokens > room:
            raise APIError(f"this model's maximum context length is {self.max_model_len} tokens; you asked for "
                           f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} to generate); lower "
                           f"{param} or shorten the prompt", param=param, code="context_length_exceeded")
        # Fields the client left out take SamplingParams' own defaults (the one place defaults live).
        given = {name: getattr(req, name) for name in SAMPLING_FIELDS if getattr(req, name, None) is not None}
        try:
            return SamplingParams(**given, max_tokens=max_tokens, ignore_eos=bool(req.ignore_eos), logprobs=logprobs,
                                  prompt_logprobs=prompt_logprobs)
        except InvalidRequestError as e:
            param = e.param if e.param in type(req).model_fields else None
            raise APIError(str(e), param=param) from None

    async def _start(self, rid: str, token_ids: list[list[int]], params: list[SamplingParams]) -> list:
        if self.max_waiting is not None and self.engine.num_waiting() >= self.max_waiting:
            raise APIError(f"the server is busy: {self.max_waiting} requests are already waiting; retry shortly",
                           status=503, code="server_overloaded", headers={"Retry-After": "1"})
        streams = []
        try:
            for i, (ids, p) in enumerate(zip(token_ids, params)):
                streams.append(await self.engine.generate(ids, p, rid if len(token_ids) == 1 else f"{rid}-{i}"))
        except BaseException as e:
            for s in streams:
                await s.aclose()
            if isinstance(e, EngineShutdownError):
                raise APIError(str(e), status=503, code="shutting_down", headers={"Retry-After": "5"}) from None
            if isinstance(e, InvalidRequestError):
                raise APIError(str(e), param=e.param, code=e.code) from None
            raise
        return streams

    async def _stream(self, streams: list, fmt: ResponseFormat, include_usage: bool) -> AsyncIterator[bytes]:
        finals: list[RequestOutput | None] = [None] * len(streams)
        try:
            for chunk in fmt.opening_chunks(len(streams)):
                yield _sse(_with_usage(chunk, include_usage))
            async with aclosing(merge(streams)) as outputs:
                async for i, out in outputs:
                    finals[i] = out
                    for chunk in fmt.chunks(i, out):
                        yield _sse(_with_usage(chunk, include_usage))
            if include_usage:
                yield _sse(fmt.usage_chunk(finals))
        except (EngineStepError, EngineShutdownError) as e:
            yield _sse(APIError(str(e), status=500).body())
        yield b"data: [DONE]\n\n"


# ---- streams ---------------------------------------------------------------------------------------
async def merge(streams: list[AsyncIterator[RequestOutput]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) as outputs arrive from several streams; closing this closes all of them."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            await streams[0].aclose()
        return
    pending = {asyncio.ensure_future(anext(s)): i for i, s in enumerate(streams)}
    try:
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                i = pending.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                pending[asyncio.ensure_future(anext(streams[i]))] = i
                yield i, out
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for s in streams:
            await s.aclose()


async def _collect(streams: list, raw: Request) -> list[RequestOutput]:
    """Every stream's final output; if the client disconnects first, abort them all."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def run() -> None:
        async with aclosing(merge(streams)) as outputs:
            async for i, out in outputs:
                finals[i] = out

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(raw))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, gone):
            task.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if not work.done() or work.cancelled():
        raise APIError("the client disconnected", status=499, code="client_disconnected")
    error = work.exception()
    if isinstance(error, (EngineStepError, EngineShutdownError)):
        raise APIError(str(error), status=500 if isinstance(error, EngineStepError) else 503)
    if error is not None:
        raise error
    return finals


async def _disconnected(raw: Request) -> None:
    while (await raw.receive())["type"] != "http.disconnect":
        pass


class _SSEResponse(StreamingResponse):
    """Server-sent events. However the response ends (done, client gone, never started), its body generator
    and the engine requests behind it are closed right away, which aborts any that are unfinished."""

    def __init__(self, body: AsyncIterator[bytes], streams: list) -> None:
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.streams = streams

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            for s in self.streams:
                await s.aclose()


def _sse(obj: dict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _with_usage(chunk: dict, include_usage: bool) -> dict:
    if include_usage:
        chunk["usage"] = None
    return chunk
