"""Prometheus metrics of one server, in a registry of its own (two apps in one process do not collide).

Request-level numbers (latencies, token counts, finish reasons) are observed as outputs stream through the
server; engine state (queues, KV cache, prefix cache, preemptions) is read from the AsyncEngine's stats
snapshot at scrape time, so it is never stale by more than one engine step."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from turboinfer.outputs import RequestOutput

PREFIX = "turboinfer_"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                   40.0, 80.0, 160.0)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                         0.5, 0.75, 1.0, 2.5)


class _EngineCollector:
    def __init__(self, async_engine) -> None:
        self.async_engine = async_engine

    def collect(self):
        s = self.async_engine.stats()
        gauges = [
            ("num_requests_running", "sequences being decoded or prefilled", s["num_running"]),
            ("num_requests_waiting", "sequences queued for admission (including preempted ones)", s["num_waiting"]),
            ("kv_cache_usage_ratio", "fraction of KV-cache blocks in use (0..1)", s["kv_usage"]),
            ("kv_cache_free_blocks", "KV-cache blocks not held by any request", s["num_free_blocks"]),
            ("kv_cache_blocks", "usable KV-cache blocks in total", s["num_blocks"]),
            ("prefix_cache_hit_rate", "fraction of looked-up prompt blocks found in the prefix cache",
             s["prefix_cache_hit_rate"]),
        ]
        for name, doc, value in gauges:
            g = GaugeMetricFamily(PREFIX + name, doc)
            g.add_metric([], float(value))
            yield g
        c = CounterMetricFamily(PREFIX + "num_preemptions", "requests preempted (blocks freed, recomputed later)")
        c.add_metric([], float(s["num_preemptions"]))
        yield c


class ServerMetrics:
    def __init__(self, async_engine) -> None:
        self.registry = CollectorRegistry()
        reg = self.registry
        self.requests = Counter(PREFIX + "request_success", "finished completions by finish reason "
                                "(stop, length, abort, error)", ["finish_reason"], registry=reg)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens processed", registry=reg)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "tokens generated", registry=reg)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "arrival to first generated token",
                              buckets=LATENCY_BUCKETS, registry=reg)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "time between generated tokens",
                             buckets=TOKEN_LATENCY_BUCKETS, registry=reg)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "arrival to the last token",
                             buckets=LATENCY_BUCKETS, registry=reg)
        reg.register(_EngineCollector(async_engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def observe(self, stream: AsyncIterator[RequestOutput], arrival: float) -> AsyncIterator[RequestOutput]:
        """Pass a request's outputs through, recording its latencies (from `arrival`, a time.monotonic() taken
        when the HTTP request came in), its tokens and how it ended."""
        last = arrival
        num_tokens: list[int] | None = None  # per completion, to count only new tokens
        finished = False
        ended = "abort"  # how an unfinished request ended: the client left or the server stopped
        try:
            async for out in stream:
                now = time.monotonic()
                if num_tokens is None:
                    num_tokens = [0] * len(out.outputs)
                    self.prompt_tokens.inc(len(out.prompt_token_ids))
                new = 0
                for i, o in enumerate(out.outputs):
                    new += len(o.token_ids) - num_tokens[i]
                    num_tokens[i] = len(o.token_ids)
                if new > 0:
                    self.generation_tokens.inc(new)
                    if sum(num_tokens) == new:
                        self.ttft.observe(now - arrival)
                    else:
                        for _ in range(new):
                            self.itl.observe((now - last) / new)
                    last = now
                if out.finished:
                    finished = True
                    self.e2e.observe(now - arrival)
                    for o in out.outputs:
                        self.requests.labels(o.finish_reason or "abort").inc()
                yield out
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except BaseException:
            ended = "error"
            raise
        finally:
            await stream.aclose()
            if not finished:
                self.requests.labels(ended).inc(len(num_tokens) if num_tokens else 1)
