"""`turboinfer bench serve` end to end against the fake streaming server from conftest.py."""

from __future__ import annotations

import json
import os

import pytest

from turboinfer.bench.cli import main
from turboinfer.errors import InvalidRequestError

LEVEL_FIELDS = ("concurrency", "request_rate", "num_requests", "completed", "failed", "duration_s", "request_s",
                "output_tok_s", "total_tok_s", "num_output_tokens", "num_requested_output_tokens",
                "token_count_source", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput_req_s", "samples")


def _run(tmp_path, *argv) -> dict:
    path = tmp_path / "serve.json"
    assert main(["serve", *argv, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def _check_level(lv: dict, num: int) -> None:
    for key in LEVEL_FIELDS:
        assert key in lv, key
    assert lv["completed"] == lv["num_requests"] == num and lv["failed"] == 0
    assert lv["num_output_tokens"] == lv["num_requested_output_tokens"]  # the fake server honours max_tokens
    assert 0 < lv["ttft_ms"]["p50"] <= lv["e2e_ms"]["p50"]
    assert lv["ttft_ms"]["max"] <= lv["e2e_ms"]["max"]
    assert lv["ttft_ms"]["p50"] <= lv["ttft_ms"]["p90"] <= lv["ttft_ms"]["p99"] <= lv["ttft_ms"]["max"]
    assert lv["tpot_ms"]["mean"] > 0 and lv["itl_ms"]["count"] > 0
    assert lv["output_tok_s"] > 0 and lv["total_tok_s"] > lv["output_tok_s"]
    assert len(lv["samples"]["ttft"]) == len(lv["samples"]["e2e"]) == num
    assert all(t <= e for t, e in zip(lv["samples"]["ttft"], lv["samples"]["e2e"]))


def test_random_workload_concurrency_sweep(tmp_path, fake_server):
    srv = fake_server(tokens_per_chunk=3)  # several tokens per chunk: the usage chunk must be what counts
    png = tmp_path / "serve.png"
    r = _run(tmp_path, "--base-url", srv.base_url, "--num-prompts", "6", "--input-len", "5:20", "--output-len",
             "4:10", "--concurrency", "1,3", "--slo", "ttft=10000,tpot=10000", "--plot", str(png))
    assert r["benchmark"] == "bench_serve" and r["model"] == "fake-model"
    for key in ("date", "command", "machine", "versions", "config", "engines", "ratios"):
        assert key in r
    assert r["command"].startswith("turboinfer bench serve --base-url")
    assert r["machine"]["cpu"] and r["versions"]["turboinfer"]
    levels = r["engines"]["target"]["levels"]
    assert [lv["concurrency"] for lv in levels] == [1, 3]
    for lv in levels:
        _check_level(lv, 6)
        assert lv["token_count_source"] == "usage"
        assert lv["goodput_req_s"] == pytest.approx(lv["request_s"])  # generous SLOs: every request meets them
    bodies = [b for b in srv.bodies if b["max_tokens"] > 4 or len(b["prompt"].split()) > 4]
    assert all(b["stream"] and b["ignore_eos"] and b["stream_options"]["include_usage"] for b in srv.bodies)
    assert bodies and all(5 <= len(b["prompt"].split()) <= 20 for b in srv.bodies[1:])  # [0] is the warm-up
    assert png.stat().st_size > 1000


def test_counts_chunks_without_usage_and_tight_slo(tmp_path, fake_server):
    srv = fake_server(send_usage=False)
    r = _run(tmp_path, "--base-url", srv.base_url, "--model", "whatever", "--num-prompts", "4", "--input-len", "8",
             "--output-len", "6", "--concurrency", "2", "--slo", "ttft=0.001", "--no-ignore-eos",
             "--api-key", "sk-x")
    lv = r["engines"]["target"]["levels"][0]
    _check_level(lv, 4)
    assert lv["token_count_source"] == "chunks" and lv["num_output_tokens"] == 24
    assert lv["goodput_req_s"] == 0  # nobody gets a first token within a microsecond
    assert all("ignore_eos" not in b and b["model"] == "whatever" for b in srv.bodies)
    assert srv.auth == ["Bearer sk-x"] * 5


def test_poisson_rate_shared_prefix(tmp_path, fake_server):
    srv = fake_server()
    r = _run(tmp_path, "--base-url", srv.base_url, "--workload", "shared-prefix", "--prefix-len", "30",
             "--num-prompts", "5", "--input-len", "4", "--output-len", "3", "--request-rate", "200",
             "--num-warmups", "0")
    assert r["config"]["request_rate"] == 200 and r["config"]["concurrency"] == [None]
    _check_level(r["engines"]["target"]["levels"][0], 5)
    prompts = [b["prompt"].split() for b in srv.bodies]
    assert len(prompts) == 5 and all(len(p) == 34 and p[:30] == prompts[0][:30] for p in prompts)


def test_sharegpt_dataset(tmp_path, fake_server):
    data = [{"conversations": [{"from": "human", "value": "Tell me about lighthouses " * 3},
                               {"from": "gpt", "value": "They guide ships. " * 5}]},
            {"conversations": [{"from": "system", "value": "be brief"}, {"from": "human", "value": "Hi there"},
                               {"from": "gpt", "value": "Hello! How can I help?"}]},
            {"conversations": [{"from": "human", "value": "no reply"}]},
            {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]}]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    srv = fake_server()
    r = _run(tmp_path, "--base-url", srv.base_url, "--dataset", str(path), "--num-prompts", "6",
             "--concurrency", "2")
    assert r["config"]["workload"] == "sharegpt"
    _check_level(r["engines"]["target"]["levels"][0], 6)
    prompts = {b["prompt"] for b in srv.bodies[1:]}
    assert prompts == {"Tell me about lighthouses " * 3, "Hi there", "What is 2+2?"}
    assert {b["max_tokens"] for b in srv.bodies[1:]} == {22, 6, 1}  # ~4 characters per token of the replies


def test_unreachable_endpoint_fails_clearly(tmp_path):
    from turboinfer.bench.compare import free_port

    with pytest.raises(InvalidRequestError, match="failed|cannot list"):
        main(["serve", "--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m", "--num-prompts", "2",
              "--output-len", "2", "--num-warmups", "0"])


@pytest.mark.slow
def test_compare_llama_cpp_server(tmp_path, fake_server, default_model_path):
    """Starts llama-cpp-python's server on the default model beside the fake target, then stops it."""
    pytest.importorskip("sse_starlette")
    srv = fake_server()
    r = _run(tmp_path, "--base-url", srv.base_url, "--num-prompts", "2", "--input-len", "8", "--output-len", "4",
             "--compare", "llama.cpp", "--compare-model", default_model_path, "--threads", "1")
    lc = r["engines"]["llama.cpp"]
    _check_level(lc["levels"][0], 2)
    assert r["ratios"]["llama.cpp"][0]["output_tok_s"] > 0
    assert os.path.basename(lc["gguf"]) == os.path.basename(default_model_path)
