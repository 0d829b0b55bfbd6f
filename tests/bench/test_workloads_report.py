"""Workload generation, statistics, and BENCHMARKS.md rendering from the JSON the commands write."""

from __future__ import annotations

import json
import random

import pytest

from turboinfer.bench.cli import main, run_report
from turboinfer.bench.results import percentile, summarize_ms
from turboinfer.bench.serve import parse_slo
from turboinfer.bench.workloads import LengthSpec, poisson_arrivals, random_token_prompts, random_workload
from turboinfer.errors import InvalidRequestError


def test_length_spec():
    assert LengthSpec.parse("128") == LengthSpec(128, 128)
    spec = LengthSpec.parse("100:1024")
    xs = spec.sample(random.Random(0), 500)
    assert min(xs) >= 100 and max(xs) <= 1024 and len(set(xs)) > 100
    assert str(spec) == "100:1024" and str(LengthSpec(5, 5)) == "5"
    for bad in ("0", "9:3", "a", "1:2:3"):
        with pytest.raises(InvalidRequestError):
            LengthSpec.parse(bad)


def test_workloads_are_seeded():
    a = random_workload(random.Random(7), 5, LengthSpec(3, 9), LengthSpec(2, 4))
    b = random_workload(random.Random(7), 5, LengthSpec(3, 9), LengthSpec(2, 4))
    assert a == b and all(len(r.prompt.split()) == r.prompt_len for r in a)
    ids = random_token_prompts(random.Random(1), [4, 6], 50, frozenset({0, 1, 2}))
    assert [len(p) for p in ids] == [4, 6] and all(3 <= t < 50 for p in ids for t in p)
    times = poisson_arrivals(random.Random(0), 2000, 10.0)
    assert times == sorted(times) and 180 < times[-1] < 220  # mean gap 1/rate
    assert poisson_arrivals(random.Random(0), 3, float("inf")) == [0.0, 0.0, 0.0]


def test_stats_and_slo():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    s = summarize_ms([0.001, 0.002, None, 0.003])
    assert s["count"] == 3 and s["mean"] == pytest.approx(2.0) and s["max"] == pytest.approx(3.0)
    assert summarize_ms([])["mean"] is None
    assert parse_slo("ttft=200,tpot=50") == {"ttft": 0.2, "tpot": 0.05}
    with pytest.raises(InvalidRequestError):
        parse_slo("latency=3")


def test_report_renders_every_kind(tmp_path, tiny_model_dir, fake_server):
    results = tmp_path / "results"
    engine = ["--model", tiny_model_dir, "--device", "cpu", "--num-threads", "1", "--kv-cache-memory", "8MiB"]
    main(["latency", *engine, "--input-len", "4", "--output-len", "3", "--num-iters", "1", "--json",
          str(results / "lat.json")])
    main(["throughput", *engine, "--num-prompts", "3", "--input-len", "4", "--output-len", "3", "--json",
          str(results / "tp.json")])
    srv = fake_server()
    main(["serve", "--base-url", srv.base_url, "--num-prompts", "3", "--input-len", "4", "--output-len", "3",
          "--concurrency", "1,2", "--slo", "ttft=1000", "--json", str(results / "serve.json")])
    (results / "other.json").write_text(json.dumps({"benchmark": "unknown"}))
    out = tmp_path / "BENCHMARKS.md"
    assert run_report(str(results), str(out)) == 0
    text = out.read_text()
    for heading in ("## Latency: batch 1, 4 prompt -> 3 output tokens", "## Offline throughput: 3 prompts",
                    "## Serving: random workload, 3 requests per level"):
        assert heading in text
    assert text.count("Machine: ") == 3 and text.count("Command: `turboinfer bench ") == 3
    assert "goodput" in text and "| target | 2 |" in text
    assert f"(from `{results / 'serve.json'}`)" in text
