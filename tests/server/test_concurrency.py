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
# Greedy output depends on which requests share a step and on prefix-cache hits: the kernel depends on the step's
# row count, a cached prefix is attended decode-style, and the packed path's bfloat16 roundings grow a float32-ulp
# difference through the layers (README, "SamplingParams"). Over these
# prompts a token's log-probability alone vs in the 32-prompt batch moved by up to 0.24 nats in bfloat16 (0.12 in
# float32), so two candidates closer than twice that can swap ("Question 9", on an AVX512/AMX Xeon: end-of-text at
# -1.09 alone against " " at -1.16, reversed in the batch).
TIE_NATS = 0.5


def diverges_at_near_tie(served: str, out, eos_ids: frozenset[int]) -> bool:
    """True when `served` (a completion's text) follows the offline output `out` (generated with logprobs) token
    for token up to one where offline's choice and served's were within TIE_NATS in offline's log-probabilities,
    i.e. a greedy near tie that batching can flip. Nothing after that token is compared."""
    prefix = ""
    for tok, lps in zip(out.token_ids, out.logprobs):
        rest = served[len(prefix):]
        piece = "" if tok in eos_ids else lps[tok].decoded_token
        if tok not in eos_ids and rest.startswith(piece):
            prefix += piece
            continue
        if tok in eos_ids and rest == "":
            return False  # no divergence: the texts are equal
        # served took another token here: one offline ranked within TIE_NATS of its own choice
        for alt, lp in lps.items():
            if alt == tok or lps[tok].logprob - lp.logprob > TIE_NATS:
                continue
            if (alt in eos_ids and rest == "") or (alt not in eos_ids and rest.startswith(lp.decoded_token)):
                return True
        return False
    return False


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
    offline = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=5),
                           use_tqdm=False)
    eos = llm.get_tokenizer().eos_token_ids
    differ = [i for i, (s, o) in enumerate(zip(served, offline)) if s[0] != o.outputs[0].text]
    for i in differ:  # every difference starts at a near tie, and they are few
        assert diverges_at_near_tie(served[i][0], offline[i].outputs[0], eos), (i, served[i], offline[i].outputs[0])
    assert len(differ) <= NUM_CLIENTS // 8, differ
    assert [s[1] for i, s in enumerate(served) if i not in differ] == \
        [o.outputs[0].finish_reason for i, o in enumerate(offline) if i not in differ]
    server.wait_idle()


def test_near_tie_check_rejects_real_differences():
    """The comparison above accepts a swap of near-tied candidates and nothing else."""
    from types import SimpleNamespace as NS

    def lp(value: float, text: str) -> NS:
        return NS(logprob=value, decoded_token=text)

    # offline: " 19" then end-of-text (id 2); " 20" was 0.3 nats behind " 19", "\n" 2 nats behind
    out = NS(token_ids=[5, 2], logprobs=[{5: lp(-1.0, " 19"), 6: lp(-1.3, " 20"), 7: lp(-3.0, "\n")},
                                         {2: lp(-0.1, "<|im_end|>"), 8: lp(-0.45, ".")}])
    eos = frozenset({2})
    assert diverges_at_near_tie(" 20 and more", out, eos)  # the runner-up at token 0
    assert diverges_at_near_tie(" 19.", out, eos)  # "." instead of the end, 0.35 nats apart
    assert not diverges_at_near_tie("\n", out, eos)  # 2 nats behind: a real difference
    assert not diverges_at_near_tie(" 21", out, eos)  # not a candidate at all
    assert not diverges_at_near_tie("", out, eos)  # ended where offline had a clear choice
    assert not diverges_at_near_tie(" 19", out, eos)  # equal texts are no divergence


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
