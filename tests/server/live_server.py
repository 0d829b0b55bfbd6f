"""Servers for the tests: real `turboinfer serve` subprocesses, and apps run in-process on a uvicorn thread,
each on a free loopback port."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

import httpx

KV_MEMORY = "128MiB"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    proc: subprocess.Popen
    base_url: str
    log_path: str
    model: str = ""

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples and labelled ones as 'name{labels}' -> value."""
        text = httpx.get(self.base_url + "/metrics", timeout=10).text
        out = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def wait_idle(self, timeout: float = 20.0) -> dict[str, float]:
        """Poll /metrics until nothing runs or waits and every KV block is free again."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["turboinfer_num_requests_running"] == 0 and m["turboinfer_num_requests_waiting"] == 0 and \
                    m["turboinfer_kv_cache_free_blocks"] == m["turboinfer_kv_cache_blocks"] and \
                    m["turboinfer_kv_cache_usage_ratio"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"server not idle after {timeout}s: {m}")
            time.sleep(0.05)

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def start_server(model_path: str, *extra: str) -> LiveServer:
    port = free_port()
    cmd = [sys.executable, "-m", "turboinfer", "serve", "--model", model_path, "--kv-cache-memory", KV_MEMORY,
           "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *extra]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("TURBOINFER_API_KEY", None)
    with tempfile.NamedTemporaryFile("w", prefix="turboinfer-serve-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    return LiveServer(proc, f"http://127.0.0.1:{port}", log.name)


def wait_ready(srv: LiveServer, timeout: float = 120.0) -> LiveServer:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"server exited with {srv.proc.returncode}:\n{srv.log()}")
        try:
            if httpx.get(srv.base_url + "/health", timeout=2).status_code == 200:
                m = re.search(r"as '([^']+)'", srv.log())
                srv.model = m.group(1) if m else ""
                return srv
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    srv.proc.kill()
    raise RuntimeError(f"server did not come up in {timeout}s:\n{srv.log()}")


class ThreadServer:
    """An ASGI app on uvicorn in a background thread (no signal handlers: those belong to the main thread)."""

    def __init__(self, app) -> None:
        import uvicorn

        port = free_port()
        self.base_url = f"http://127.0.0.1:{port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn-test", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(20)
