"""Errors in OpenAI's shape from the live server: 400s that name the parameter, 404/405 for unknown routes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


BAD_REQUESTS = [
    # (path, body (None: model filled in), param the error must name, text the message must contain)
    (COMPLETIONS, '{"prompt": "x", ', None, "not valid JSON"),
    (COMPLETIONS, "[1, 2]", None, "JSON object"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
    (COMPLETIONS, {"prompt": "x", "temperature": True}, "temperature", "number"),
    (COMPLETIONS, {"prompt": 5}, "prompt", "string"),
    (COMPLETIONS, {"prompt": "x", "foo": 1, "bar": 2}, "foo", "foo, bar"),
    (COMPLETIONS, {"prompt": "x", "suffix": "!"}, "suffix", "suffix"),
    (COMPLETIONS, {"prompt": "x", "best_of": 3}, "best_of", "best_of"),
    (COMPLETIONS, {"prompt": "x", "logit_bias": {"50256": -100}}, "logit_bias", "logit_bias"),
    (COMPLETIONS, {"prompt": "x", "max_tokens": 100000}, "max_tokens", "maximum context length"),
    (COMPLETIONS, {"prompt": "hello " * 7000}, "prompt", "maximum context length"),
    (COMPLETIONS, {"prompt": []}, "prompt", "empty"),
    (COMPLETIONS, {"prompt": [10**9]}, "prompt", "vocabulary"),
    (COMPLETIONS, {"prompt": "x", "stop": [""]}, "stop", "non-empty"),
    (COMPLETIONS, {"prompt": "x", "stop_token_ids": [-1]}, "stop_token_ids", "vocabulary"),
    (COMPLETIONS, {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens", "min_tokens"),
    (COMPLETIONS, {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "stream"),
    (COMPLETIONS, {"prompt": "x", "n": 0}, "n", "greater than or equal to 1"),
    (COMPLETIONS, {"prompt": "x", "seed": 2**70}, "seed", "less than or equal"),
    (COMPLETIONS, {"model": "gpt-4", "prompt": "x"}, "model", "does not exist"),
    (COMPLETIONS, {"prompt": "\ud800"}, None, "Unicode"),
    (CHAT, {"messages": []}, "messages", "at least 1"),
    (CHAT, {"messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
    (CHAT, {"messages": USER, "functions": [{"name": "f"}]}, "functions", "functions"),
    (CHAT, {"messages": USER, "response_format": {"type": "json_object"}}, "response_format", "response_format"),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", "logprobs"),
    (CHAT, {"messages": USER, "max_tokens": 3, "max_completion_tokens": 4}, "max_completion_tokens", "disagree"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role", "user"),
    (CHAT, {"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", "name"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type", "image_url"),
    (CHAT, {"messages": USER, "max_completion_tokens": 10**6}, "max_completion_tokens", "maximum context length"),
]


@pytest.mark.parametrize("path,body,param,text", BAD_REQUESTS,
                         ids=[f"{i}-{p.rsplit('/', 1)[1]}" for i, (p, *_) in enumerate(BAD_REQUESTS)])
def test_bad_requests_are_400_naming_the_parameter(server, path, body, param, text):
    if isinstance(body, dict):
        body = json.dumps({"model": server.model, **body})
    r = httpx.post(server.base_url + path, content=body, headers={"Content-Type": "application/json"}, timeout=30)
    err = _error(r, 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert text in err["message"], err["message"]


def test_openai_client_sees_the_error(server, client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=USER, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "tools" in str(info.value)
    _error(httpx.get(server.base_url + "/v1/nothing-here"), 404)
    _error(httpx.delete(server.base_url + "/v1/models"), 405)
    server.wait_idle()
