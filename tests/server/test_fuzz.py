"""Fuzz the live API from its own OpenAPI schema (schemathesis): valid and invalid bodies alike must never
get a 5xx, and the server must still be healthy and idle afterwards.

Generation is capped at a few tokens (and a few sequences) per request so the run stays short; everything
else — types, ranges, unknown fields, odd strings — is left to the generator."""

from __future__ import annotations

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="pip install schemathesis (in the test extra)")
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

MAX_EXAMPLES = 120
TOKEN_FIELDS = ("max_tokens", "max_completion_tokens")


def _keep_it_short(body):
    """Cap what makes a request slow (tokens to generate, sequences); leave every other value as generated."""
    if not isinstance(body, dict):
        return body
    for field in TOKEN_FIELDS:
        value = body.get(field)
        if value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 4):
            body[field] = 4 if field == "max_tokens" or "max_tokens" not in body else body["max_tokens"]
    for field, cap in (("n", 3), ("min_tokens", 4)):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > cap:
            body[field] = cap
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) > 3 and all(isinstance(p, (str, list)) for p in prompt):
        body["prompt"] = prompt[:3]
    return body


def test_fuzzed_requests_never_get_a_5xx(server):
    from schemathesis import GenerationMode

    raw = httpx.get(server.base_url + "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(raw)
    operations = [op.ok() for op in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models"}
    strategies = [op.as_strategy(generation_mode=mode) for op in operations
                  for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)]
    # Real bodies point at the served model most of the time, so generation gets past the model check.
    real_model = st.sampled_from([server.model, server.model, server.model, None])
    seen: dict[int, int] = {}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, derandomize=True,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(case=st.one_of(strategies), model=real_model)
    def check(case, model):
        if isinstance(case.body, dict):
            if model is not None and isinstance(case.body.get("model"), str):
                case.body["model"] = model
            case.body = _keep_it_short(case.body)
        response = case.call(base_url=server.base_url, timeout=60)
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text)

    check()
    assert any(code == 200 for code in seen) and any(code == 400 for code in seen), seen
    assert httpx.get(server.base_url + "/health").json() == {"status": "ok"}
    server.wait_idle()
