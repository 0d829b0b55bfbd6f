"""The app's guards, served in-process over a scripted engine (no model): the API key, the waiting-queue
limit (503 + Retry-After), the per-request token limit, and engine failures reaching the client."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest

from turboinfer.engine.async_engine import AsyncEngine
from turboinfer.server.app import build_app

from live_server import ThreadServer
from scripted_engine import ScriptedEngine

API_KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def guarded():
    fake = ScriptedEngine(max_running=1, step_delay=0.01)
    async_engine = AsyncEngine(fake)
    app = build_app(async_engine, "scripted", api_key=API_KEY, max_waiting=1, max_tokens_limit=50)
    srv = ThreadServer(app)
    srv.fake = fake
    yield srv
    srv.stop()
    assert not async_engine.is_running()  # the app's shutdown stopped the engine thread


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_api_key(guarded):
    base = guarded.base_url
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
        err = _error(httpx.get(base + "/v1/models", headers=headers), 401)
        assert err["code"] == "invalid_api_key" and err["type"] == "authentication_error"
    # the key is checked before the body is even parsed
    _error(httpx.post(base + COMPLETIONS, content="{not json", headers={"Content-Type": "application/json"}), 401)
    assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/metrics").status_code == 200
    good = openai.OpenAI(base_url=base + "/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == ["scripted"]
    assert good.completions.create(model="scripted", prompt="hi", max_tokens=3).choices[0].text == "abc"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="nope", max_retries=0).models.list()


def test_max_tokens_limit(guarded):
    client = openai.OpenAI(base_url=guarded.base_url + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="at most 50"):
        client.completions.create(model="scripted", prompt="x", max_tokens=51)
    r = client.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens == 50 and r.choices[0].finish_reason == "length"  # the default is capped


def test_503_when_the_waiting_queue_is_full(guarded):
    base = guarded.base_url
    long = {"model": "scripted", "prompt": "endless", "max_tokens": 2, "stream": True}
    with httpx.Client(base_url=base, headers=AUTH, timeout=30) as http, \
            http.stream("POST", COMPLETIONS, json=long) as running:  # the one running slot
        lines = running.iter_lines()  # keep a reference: a collected iterator would close the connection
        assert next(lines).startswith("data: ")
        queued: dict = {}
        waiter = threading.Thread(target=lambda: queued.setdefault("r", httpx.post(
            base + COMPLETIONS, headers=AUTH, timeout=30, json={"model": "scripted", "prompt": "y", "max_tokens": 2})))
        waiter.start()
        _wait_for(lambda: _metric(base, "turboinfer_num_requests_waiting") == 1)
        r = http.post(COMPLETIONS, json={"model": "scripted", "prompt": "z", "max_tokens": 2})
        err = _error(r, 503)
        assert r.headers["Retry-After"] == "1" and err["type"] == "server_error"
    # leaving the running stream aborts it, so the queued request gets its turn
    waiter.join(30)
    assert queued["r"].status_code == 200 and queued["r"].json()["choices"][0]["text"] == "ab"
    _wait_for(lambda: _metric(base, "turboinfer_kv_cache_free_blocks") == 8)


def test_engine_failure_fails_the_request_not_the_server(guarded):
    base, fake = guarded.base_url, guarded.fake
    fake.fail_steps = 1
    err = _error(httpx.post(base + COMPLETIONS, headers=AUTH, json={"model": "scripted", "prompt": "x"}), 500)
    assert "kernel exploded" in err["message"] and err["type"] == "server_error"
    fake.fail_steps = 1
    body = {"model": "scripted", "prompt": "x", "stream": True}
    with httpx.stream("POST", base + COMPLETIONS, headers=AUTH, json=body) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert "kernel exploded" in json.loads(events[-2])["error"]["message"] and events[-1] == "[DONE]"
    ok = httpx.post(base + COMPLETIONS, headers=AUTH, json={"model": "scripted", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200
    assert _metric(base, 'turboinfer_request_success_total{finish_reason="error"}') == 2


def _metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def _wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)
