"""Many clients at once, and clients that leave: outputs match offline generation, blocks come back."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from live_server import KV_MEMORY

NUM_CLIENTS = 32
MAX_TOKENS = 12
PROMPTS = [f"Question {i}: what is {i} plus {i + 1}? Answer:" if i % 2 else f"Write a haiku about the number {i}."
           for i in range(NUM_CLIENTS)]


def test_concurrent_streams_match_offline_generation(server, default_model_path):
    import openai

    from turboinfer import LLM, SamplingParams

    async def one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str]:
        stream = await client.completions.create(model=server.model, prompt=prompt, temperature=0,
                                                 max_tokens=MAX_TOKENS, stream=True)
        parts, reason = [], None
        async for chunk in stream:
            parts.append(chunk.choices[0].text)
            reason = chunk.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def all_clients():
        async with openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0,
                                      timeout=120, http_client=httpx.AsyncClient(
                                          limits=httpx.Limits(max_connections=NUM_CLIENTS))) as client:
            return await asyncio.gather(*(one(client, p) for p in PROMPTS))

    served = asyncio.run(all_clients())
    llm = LLM(default_model_path, kv_cache_memory=KV_MEMORY)  # the server's settings
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    assert [s[0] for s in served] == [o.outputs[0].text for o in offline]
    assert [s[1] for s in served] == [o.outputs[0].finish_reason for o in offline]
    server.wait_idle()


def test_disconnect_mid_stream_aborts_and_frees_blocks(server):
    before = server.metrics().get('turboinfer_request_success_total{finish_reason="abort"}', 0.0)
    body = {"model": server.model, "prompt": "Count from one to one thousand: one, two,", "max_tokens": 2000,
            "ignore_eos": True, "temperature": 0, "stream": True}
    num_chunks = 0
    with httpx.Client(base_url=server.base_url, timeout=30) as http:
        with http.stream("POST", "/v1/completions", json=body) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    assert json.loads(line[6:])["choices"]
                    num_chunks += 1
                    if num_chunks == 2:
                        break  # leaving the block closes the connection mid-stream
    assert num_chunks == 2
    metrics = server.wait_idle(timeout=10)
    assert metrics['turboinfer_request_success_total{finish_reason="abort"}'] == before + 1


def test_disconnect_while_waiting_for_non_stream_response(server):
    before = server.metrics().get('turboinfer_request_success_total{finish_reason="abort"}', 0.0)
    body = {"model": server.model, "prompt": "Tell me everything.", "max_tokens": 2000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and hangs up
        httpx.post(server.base_url + "/v1/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    deadline = time.monotonic() + 10
    while server.metrics().get('turboinfer_request_success_total{finish_reason="abort"}', 0.0) < before + 1:
        assert time.monotonic() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)
    server.wait_idle(timeout=10)


def test_metrics_exposition(server, client):
    client.completions.create(model=server.model, prompt="Hello", max_tokens=3, temperature=0)
    text = httpx.get(server.base_url + "/metrics").text
    for name in ("turboinfer_request_success_total", "turboinfer_time_to_first_token_seconds_bucket",
                 "turboinfer_inter_token_latency_seconds_bucket", "turboinfer_e2e_request_latency_seconds_count",
                 "turboinfer_num_requests_running", "turboinfer_num_requests_waiting",
                 "turboinfer_kv_cache_usage_ratio", "turboinfer_prefix_cache_hit_rate", "turboinfer_num_preemptions_total",
                 "turboinfer_prompt_tokens_total", "turboinfer_generation_tokens_total"):
        assert name in text, name
    m = server.metrics()
    assert m["turboinfer_generation_tokens_total"] >= 3 and m["turboinfer_e2e_request_latency_seconds_count"] >= 1
