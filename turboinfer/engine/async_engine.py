"""The Engine behind an asyncio front door (the HTTP server).

One background thread owns the Engine and is the only thread that calls into it: it drains a command
inbox (add / abort), runs `step()` while any request is unfinished, and sleeps on a condition when there
is nothing to do. Each RequestOutput goes back to the asyncio queue of the request it belongs to through
`loop.call_soon_threadsafe`, one call per event loop per step. Callers touch only what is fixed after load
(tokenizer, sizes) and a stats snapshot the thread refreshes after every iteration.

A request lives from `generate()` until its stream ends; a consumer that stops early (client disconnect,
cancellation, `aclose()`) aborts it, which frees its KV blocks on the engine thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections import deque
from dataclasses import dataclass, replace

from turboinfer.engine.engine import Engine
from turboinfer.errors import InvalidRequestError, TurboInferError
from turboinfer.outputs import CompletionOutput, RequestOutput
from turboinfer.sampling_params import SamplingParams

logger = logging.getLogger("turboinfer")


class EngineStepError(TurboInferError):
    """The engine raised while running a batch; every request in it fails with this instead of hanging."""


class EngineShutdownError(TurboInferError):
    """The engine is shutting down and takes no new requests."""


@dataclass
class _Stream:
    request_id: str
    loop: asyncio.AbstractEventLoop  # the caller's loop: outputs are handed over with call_soon_threadsafe
    queue: asyncio.Queue  # RequestOutput items, or one exception that ends the stream
    prompt: str | list[int]
    prompt_token_ids: list[int]
    params: SamplingParams
    last: RequestOutput | None = None  # to build a final "abort" output when shutdown cuts the request off


class RequestStream:
    """The outputs of one request, as an async iterator. Closing it (`aclose()`), cancelling a read, or
    dropping it unfinished aborts the request; reading past the finished output ends the iteration."""

    def __init__(self, owner: AsyncEngine, stream: _Stream) -> None:
        self.request_id = stream.request_id
        self._owner = owner
        self._queue = stream.queue
        self._finished = False  # the final output (or an error) was read: nothing left to abort
        self._closed = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the reader is gone
            self._close()
            raise
        if isinstance(item, BaseException):
            self._finished = True  # failed on the engine side, which already dropped it
            self._close()
            raise item
        if item.finished:
            self._finished = True
            self._close()
        return item

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._release(self.request_id, abort=not self._finished)

    def __del__(self) -> None:
        self._close()


class AsyncEngine:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.info = engine.info
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self._cond = threading.Condition()
        self._inbox: deque[tuple[str, object]] = deque()  # ("add", _Stream) | ("abort", request_id)
        self._live: set[str] = set()  # ids between generate() and the end of their stream (duplicate check)
        self._num_pending = 0  # added by callers, not yet handed to the engine: they wait too
        self._stopping: str | None = None  # None, "finish" (drain in-flight work) or "abort"
        self._stats = engine.stats()
        self._thread = threading.Thread(target=self._loop, name="turboinfer-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config) -> AsyncEngine:
        return cls(Engine(config))

    # ---- caller side (any thread with a running asyncio loop) ----------------------------------------
    def tokenize_prompt(self, prompt: str | list[int]) -> list[int]:
        """Validate and tokenize as Engine.add_request does; reads only the tokenizer and fixed sizes."""
        return self.engine.tokenize_prompt(prompt)

    def check_params(self, params: SamplingParams) -> None:
        """Engine.check_params: fixed facts only, safe from any thread."""
        self.engine.check_params(params)

    async def generate(self, prompt: str | list[int], params: SamplingParams | None = None,
                       request_id: str | None = None) -> RequestStream:
        """Queue a request and return its stream of RequestOutputs (the last one has `finished`).

        Invalid prompts, parameters or ids raise here, before anything streams. Leaving the stream early
        (break + aclose, cancellation, garbage collection) aborts the request and frees its blocks."""
        params = params or SamplingParams()
        self.check_params(params)
        ids = self.tokenize_prompt(prompt)
        request_id = request_id or f"req-{uuid.uuid4().hex}"
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(f"request id must be a non-empty string, got {request_id!r}")
        stream = _Stream(request_id, asyncio.get_running_loop(), asyncio.Queue(), prompt, ids, params)
        with self._cond:
            if self._stopping is not None or not self._thread.is_alive():
                raise EngineShutdownError("the engine is shutting down and takes no new requests")
            if request_id in self._live:
                raise InvalidRequestError(f"request id {request_id!r} is already in use")
            self._live.add(request_id)
            self._num_pending += 1
            self._inbox.append(("add", stream))
            self._cond.notify()
        return RequestStream(self, stream)

    def _release(self, request_id: str, abort: bool) -> None:
        with self._cond:
            self._live.discard(request_id)
            if abort:
                self._inbox.append(("abort", request_id))
                self._cond.notify()

    def abort(self, request_id: str) -> None:
        """Abort a request from any thread; its stream, if still read, ends with finish_reason "abort"."""
        with self._cond:
            self._inbox.append(("abort", request_id))
            self._cond.notify()

    def stats(self) -> dict:
        """Engine.stats() as of the last loop iteration; num_waiting includes requests not yet admitted."""
        with self._cond:
            stats = dict(self._stats)
            stats["num_waiting"] += self._num_pending
        return stats

    def num_waiting(self) -> int:
        return self.stats()["num_waiting"]

    def is_running(self) -> bool:
        return self._thread.is_alive() and self._stopping is None

    def shutdown(self, abort: bool = False, timeout: float | None = None) -> None:
        """Stop taking requests; finish in-flight ones (abort them when `abort`, or once `timeout` seconds
        have passed), then join the engine thread. Aborted requests end with finish_reason "abort"."""
        with self._cond:
            if self._stopping != "abort":
                self._stopping = "abort" if abort else "finish"
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            with self._cond:
                self._stopping = "abort"
                self._cond.notify()
            self._thread.join()

    # ---- engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        streams: dict[str, _Stream] = {}  # owned by this thread
        try:
            self._run(streams)
        except BaseException as e:  # a bug in the loop itself: fail everyone rather than hang them
            logger.exception("the engine loop died")
            with self._cond:
                self._stopping = "abort"
                pending = [arg for kind, arg in self._inbox if kind == "add"]
                self._inbox.clear()
            _deliver([(s, EngineStepError(f"the engine loop died: {type(e).__name__}: {e}"))
                      for s in [*streams.values(), *pending]])

    def _run(self, streams: dict[str, _Stream]) -> None:
        engine = self.engine
        while True:
            with self._cond:
                while not self._inbox and not engine.has_unfinished() and self._stopping is None:
                    self._cond.wait()
                commands = list(self._inbox)
                self._inbox.clear()
                stopping = self._stopping
            for kind, arg in commands:
                if kind == "add":
                    self._add(arg, streams)
                else:
                    engine.abort(arg)
                    stream = streams.pop(arg, None)
                    if stream is not None:  # a reader may still wait on it (abort() from elsewhere)
                        _deliver([(stream, _aborted_output(stream))])
            if stopping == "abort" or (stopping == "finish" and not engine.has_unfinished()):
                break
            if engine.has_unfinished():
                self._step(streams)
            self._refresh_stats()
        for rid, stream in streams.items():
            engine.abort(rid)
            _deliver([(stream, _aborted_output(stream))])
        streams.clear()
        self._refresh_stats()

    def _add(self, stream: _Stream, streams: dict[str, _Stream]) -> None:
        try:
            self.engine.add_request(stream.prompt_token_ids, stream.params, stream.request_id,
                                    prompt_text=stream.prompt if isinstance(stream.prompt, str) else None)
        except Exception as e:
            with self._cond:
                self._num_pending -= 1
            if not isinstance(e, TurboInferError):
                logger.exception("adding request %s failed", stream.request_id)
                e = EngineStepError(f"the engine could not add request {stream.request_id}: {type(e).__name__}: {e}")
            _deliver([(stream, e)])
            return
        # The engine counts it as waiting from now on: hand the count over in one step, or stats() would miss it
        # until the next refresh and a full waiting queue (--max-waiting-requests) could admit one more.
        stats = self.engine.stats()
        with self._cond:
            self._num_pending -= 1
            self._stats = stats
        streams[stream.request_id] = stream

    def _step(self, streams: dict[str, _Stream]) -> None:
        try:
            outputs = self.engine.step()
        except Exception as e:
            logger.exception("engine step failed; failing %d in-flight request(s)", len(streams))
            failed = []
            for rid, stream in streams.items():
                failed.append((stream, EngineStepError(
                    f"the engine failed while running request {rid}: {type(e).__name__}: {e}")))
                try:
                    self.engine.abort(rid)
                except Exception:
                    logger.exception("aborting %s after a failed step also failed", rid)
            streams.clear()
            _deliver(failed)
            return
        ready = []
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:  # aborted by its consumer while this step ran
                continue
            stream.last = out
            ready.append((stream, out))
            if out.finished:
                del streams[out.request_id]
        _deliver(ready)

    def _refresh_stats(self) -> None:
        stats = self.engine.stats()
        with self._cond:
            self._stats = stats


def _deliver(items: list[tuple[_Stream, object]]) -> None:
    """Hand items to their streams' queues: one thread-safe call per event loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
    for stream, item in items:
        by_loop.setdefault(stream.loop, []).append((stream.queue, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, batch)
        except RuntimeError:  # that loop is closed: nobody is listening any more
            pass


def _put_all(batch: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in batch:
        queue.put_nowait(item)


def _aborted_output(stream: _Stream) -> RequestOutput:
    """The final output of a request cut off by shutdown: what it had, finish_reason "abort"."""
    last = stream.last
    if last is None:
        outs = [CompletionOutput(index=i, text="", token_ids=[], cumulative_logprob=None, logprobs=None,
                                 finish_reason="abort") for i in range(stream.params.n)]
        return RequestOutput(request_id=stream.request_id, prompt=stream.prompt if isinstance(stream.prompt, str)
                             else None, prompt_token_ids=stream.prompt_token_ids, prompt_logprobs=None,
                             outputs=outs, finished=True)
    outs = [replace(o, delta="", finish_reason=o.finish_reason or "abort") for o in last.outputs]
    return replace(last, outputs=outs, finished=True)
