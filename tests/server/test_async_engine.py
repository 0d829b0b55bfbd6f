"""AsyncEngine over a scripted stand-in engine: routing, early exits, failures, shutdown (no model, fast)."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from scripted_engine import ScriptedEngine

from turboinfer.engine.async_engine import AsyncEngine, EngineShutdownError, EngineStepError
from turboinfer.errors import InvalidRequestError
from turboinfer.sampling_params import SamplingParams


@pytest.fixture
def engine():
    fake = ScriptedEngine()
    async_engine = AsyncEngine(fake)
    yield fake, async_engine
    async_engine.shutdown(abort=True)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _drain(stream) -> list:
    return [out async for out in stream]


def test_concurrent_requests_are_routed_to_their_own_streams(engine):
    _, ae = engine

    async def main():
        streams = [await ae.generate("hi", SamplingParams(max_tokens=k), f"r{k}") for k in (1, 3, 5)]
        return await asyncio.gather(*(_drain(s) for s in streams))

    results = run(main())
    for k, outs in zip((1, 3, 5), results):
        assert [o.request_id for o in outs] == [f"r{k}"] * k
        assert "".join(o.outputs[0].delta for o in outs) == "abcde"[:k]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])


def test_invalid_requests_raise_before_streaming(engine):
    fake, ae = engine

    async def main():
        with pytest.raises(InvalidRequestError, match="empty"):
            await ae.generate("", SamplingParams())
        params = SamplingParams()
        params.max_tokens = 0  # validated again on the way in
        with pytest.raises(InvalidRequestError, match="max_tokens"):
            await ae.generate("x", params)
        stream = await ae.generate("x", SamplingParams(max_tokens=50), "same")
        with pytest.raises(InvalidRequestError, match="already in use"):
            await ae.generate("y", SamplingParams(), "same")
        await stream.aclose()

    run(main())
    _wait(lambda: fake.aborted == ["same"] and not fake.requests)


def test_leaving_a_stream_early_aborts_the_request(engine):
    fake, ae = engine

    async def break_out():
        stream = await ae.generate("x", SamplingParams(max_tokens=10_000), "left")
        async for _ in stream:
            break
        await stream.aclose()

    async def cancelled():
        stream = await ae.generate("x", SamplingParams(max_tokens=10_000), "cancelled")
        task = asyncio.ensure_future(_drain(stream))
        await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    run(break_out())
    run(cancelled())
    _wait(lambda: set(fake.aborted) == {"left", "cancelled"} and not fake.requests)
    _wait(lambda: ae.stats()["num_running"] == 0)


def test_abort_from_outside_ends_the_stream(engine):
    fake, ae = engine

    async def main():
        stream = await ae.generate("x", SamplingParams(max_tokens=10_000), "outside")
        await anext(stream)
        ae.abort("outside")
        return await _drain(stream)

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert fake.aborted == ["outside"]


def test_a_stream_dropped_unread_is_aborted(engine):
    fake, ae = engine

    async def main():
        stream = await ae.generate("x", SamplingParams(max_tokens=10_000), "dropped")
        del stream  # never read, never closed

    run(main())
    _wait(lambda: fake.aborted == ["dropped"] and not fake.requests)


def test_a_failing_step_fails_in_flight_requests_and_the_loop_goes_on(engine):
    fake, ae = engine

    async def main():
        streams = [await ae.generate("x", SamplingParams(max_tokens=10_000), f"f{i}") for i in range(3)]
        fake.fail_steps = 1
        for s in streams:
            with pytest.raises(EngineStepError, match="kernel exploded"):
                await _drain(s)
        assert not fake.requests  # the failed requests were aborted, nothing holds blocks
        return await _drain(await ae.generate("x", SamplingParams(max_tokens=2)))

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].text == "ab"


def test_shutdown_finishes_in_flight_requests(engine):
    _, ae = engine

    async def main():
        stream = await ae.generate("x", SamplingParams(max_tokens=20), "long")
        stopper = threading.Thread(target=ae.shutdown)
        stopper.start()
        outs = await _drain(stream)
        stopper.join(5)
        assert not stopper.is_alive()
        with pytest.raises(EngineShutdownError):
            await ae.generate("x", SamplingParams())
        return outs

    outs = run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "length" and len(outs) == 20


def test_shutdown_abort_ends_streams_with_abort(engine):
    fake, ae = engine

    async def main():
        stream = await ae.generate("x", SamplingParams(max_tokens=10_000), "cut")
        first = await anext(stream)
        await asyncio.to_thread(ae.shutdown, True)
        rest = await _drain(stream)
        return first, rest

    first, rest = run(main())
    assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert rest[-1].outputs[0].text.startswith(first.outputs[0].text)
    assert "cut" in fake.aborted


def test_idle_loop_sleeps(engine):
    fake, _ = engine
    time.sleep(0.05)
    before = fake.num_has_unfinished_calls
    time.sleep(0.3)
    assert fake.num_has_unfinished_calls - before <= 2  # no spinning while there is nothing to do


def _wait(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_a_request_is_counted_as_waiting_while_the_engine_takes_it():
    """num_waiting() (what --max-waiting-requests checks) counts a queued request without a gap: before, the count
    left the pending tally when the engine thread picked the request up and reached the engine's own stats only at
    the end of that loop iteration, so a full queue could admit one more request in between."""
    fake = ScriptedEngine(max_running=1, step_delay=0.01)
    add = fake.add_request

    def slow_add(*args, **kw):
        time.sleep(0.2)  # widen the hand-over
        add(*args, **kw)

    fake.add_request = slow_add
    ae = AsyncEngine(fake)
    try:
        async def main():
            running = await ae.generate("endless", SamplingParams(max_tokens=2), "running")
            await running.__anext__()  # it holds the one running slot
            queued = await ae.generate("y", SamplingParams(max_tokens=2), "queued")  # held: a dropped one aborts
            seen = []
            for _ in range(60):
                seen.append(ae.num_waiting())
                await asyncio.sleep(0.01)
            await running.aclose()
            await queued.aclose()
            return seen

        seen = run(main())
        assert min(seen) == 1, seen
    finally:
        ae.shutdown(abort=True)
