"""SIGTERM: in-flight requests finish, then the server exits with status 0. Stops the session's server, so
conftest.py runs this module last."""

from __future__ import annotations

import json

import httpx


def test_sigterm_finishes_in_flight_requests_and_exits_cleanly(server):
    body = {"model": server.model, "prompt": "Count:", "max_tokens": 24, "ignore_eos": True, "stream": True}
    events = []
    with httpx.Client(base_url=server.base_url, timeout=60) as http, \
            http.stream("POST", "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 1:
                    server.proc.terminate()  # SIGTERM while the request is in flight
    assert events[-1] == "[DONE]"
    finish_reasons = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
    assert finish_reasons[-1] == "length" and len(events) - 1 == 24  # it was allowed to finish
    assert server.stop(timeout=30) == 0
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log
