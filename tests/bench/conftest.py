"""Fixtures for the benchmark tests: a tiny random-weight model, and a fake OpenAI-compatible streaming server
(plain asyncio, 127.0.0.1, its own thread) so `bench serve` is tested without a real engine behind it."""

from __future__ import annotations

import asyncio
import json
import threading
from dataclasses import dataclass, field

import pytest
from tiny_models import make_tiny_model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path, _ = make_tiny_model(tmp_path_factory, "llama-mqa")
    return path


@dataclass
class FakeServer:
    """Streams exactly max_tokens tokens per completion, `tokens_per_chunk` at a time (one word each), with a
    final usage chunk when asked for it and `send_usage` is on."""

    tokens_per_chunk: int = 1
    send_usage: bool = True
    token_delay_s: float = 0.002
    bodies: list[dict] = field(default_factory=list)  # every completion request received
    auth: list[str | None] = field(default_factory=list)  # its Authorization header
    base_url: str = ""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers = {}
            while (line := (await reader.readline()).decode().strip()):
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            method, path, _ = request_line.split(" ", 2)
            if method == "GET" and path == "/v1/models":
                payload = json.dumps({"object": "list", "data": [{"id": "fake-model", "object": "model"}]}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
            elif method == "POST" and path == "/v1/completions":
                self.auth.append(headers.get("authorization"))
                await self._stream(json.loads(body), writer)
            else:
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            await writer.drain()
        finally:
            writer.close()

    async def _stream(self, req: dict, writer: asyncio.StreamWriter) -> None:
        self.bodies.append(req)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
        n = req["max_tokens"]
        await asyncio.sleep(0.005)  # "prefill"

        def event(obj) -> bytes:
            return b"data: " + json.dumps(obj).encode() + b"\n\n"

        sent = 0
        while sent < n:
            k = min(self.tokens_per_chunk, n - sent)
            sent += k
            writer.write(event({"id": "cmpl-1", "object": "text_completion", "model": req["model"],
                                "choices": [{"index": 0, "text": " tok" * k, "logprobs": None,
                                             "finish_reason": "length" if sent == n else None}]}))
            await writer.drain()
            await asyncio.sleep(self.token_delay_s)
        if self.send_usage and (req.get("stream_options") or {}).get("include_usage"):
            prompt_tokens = len(req["prompt"].split())
            writer.write(event({"id": "cmpl-1", "object": "text_completion", "model": req["model"], "choices": [],
                                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n,
                                          "total_tokens": prompt_tokens + n}}))
        writer.write(b"data: [DONE]\n\n")


def _start(server: FakeServer):
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()

    async def main():
        srv = await asyncio.start_server(server._handle, "127.0.0.1", 0)
        server.base_url = f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}/v1"
        started.set()
        await stop.wait()
        srv.close()

    thread = threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True)
    thread.start()
    assert started.wait(10)
    return loop, thread, stop


@pytest.fixture
def fake_server():
    """A factory: fake_server(tokens_per_chunk=3, send_usage=False) -> a running FakeServer."""
    running = []

    def make(**kw) -> FakeServer:
        server = FakeServer(**kw)
        running.append(_start(server))
        return server

    yield make
    for loop, thread, stop in running:
        loop.call_soon_threadsafe(stop.set)
        thread.join(5)
