"""Helpers of the scripts in benchmarks/ that the engine tests do not reach: quant_quality.py's KL figures,
long_context_cpu.py's and mixed_batch_cpu.py's prompts, and how report.py renders them into BENCHMARKS.md."""

from __future__ import annotations

import importlib.util
import math
import os

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_divergence_against_hand_computed_values():
    qq = _load("quant_quality")
    ref = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    same = qq.divergence(ref.clone(), ref)
    assert same["kl_mean"] == 0.0 and same["top1_agreement"] == 1.0

    quant = torch.tensor([[0.0, math.log(3.0)], [2.0, 0.0]])  # row 0: p = (1/2, 1/2) against q = (1/4, 3/4)
    d = qq.divergence(quant, ref)
    kl_row0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert math.isclose(d["kl_mean"], kl_row0 / 2, rel_tol=1e-5)
    assert math.isclose(d["kl_p99"], kl_row0 * 0.99, rel_tol=1e-5)  # linear between 0 and kl_row0
    assert d["top1_agreement"] == 0.5  # row 0's tie goes to index 0 in ref and index 1 in quant


def test_report_shows_kl_and_top_token_columns():
    report = _load("report")
    row = {"method": "awq", "group_size": 64, "perplexity": 25.0, "vs_float_pct": 7.6, "rel_logit_error": 0.24,
           "kl_mean": 0.0879, "kl_p99": 0.339, "top1_agreement": 0.844, "quantize_s": 31.0,
           "layer_group_sizes": {"576": 64, "1536": 64}}
    old = {k: v for k, v in row.items() if k not in ("kl_mean", "kl_p99", "top1_agreement")}  # earlier JSON
    record = {"model": "m", "float_source": "GGUF dequantized to float32", "text_tokens": 10, "text": "t.txt",
              "threads": 1, "calibration_tokens": 5, "command": "python benchmarks/quant_quality.py",
              "machine": {"cpu": "cpu", "cores": 2}, "versions": {}, "date": "2026-11-23", "rows": [row, old]}
    text = report.render_quant_quality_cpu(record)
    assert "| int4 AWQ | 64 | 25.000 | +7.6% | 0.240 | 0.0879 / 0.339 | 84.4% | 31.0 |" in text
    assert "| int4 AWQ | 64 | 25.000 | +7.6% | 0.240 | - | - | 31.0 |" in text
    assert "built-in text (5 tokens)" in text
    both = report.render_quant_quality_cpu({**record, "gptq_calibration_tokens": 50,
                                             "rows": [{**row, "method": "awq-gptq"}]})
    assert "| int4 AWQ + GPTQ | 64 |" in both and "(5 tokens), GPTQ and AWQ + GPTQ on all of it (50 tokens)" in both


def test_long_context_prompts_differ_only_in_first_token():
    lc = _load("long_context_cpu")
    runs = lc.prompts([5, 6, 7, 8], 10, 3)
    assert [len(p) for p in runs] == [10, 10, 10]
    assert [p[0] for p in runs] == [5, 6, 7] and runs[0][1:] == runs[2][1:] == [5, 6, 7, 8, 5, 6, 7, 8, 5]
    t = lc.timings([1.5, 1.6, 1.8], 1.0)
    assert math.isclose(t["ttft_s"], 0.5) and math.isclose(t["decode_tok_s"], 2 / 0.3)


def test_report_renders_long_context_rows():
    report = _load("report")
    row = {"prompt_tokens": 8000, "turboinfer": {"ttft_s": 9.0, "decode_tok_s": 39.0},
           "llama.cpp": {"ttft_s": 60.0, "decode_tok_s": 26.0}}
    record = {"model": "m", "threads": 2, "command": "python benchmarks/long_context_cpu.py", "repeats": 2,
              "new_tokens": 32, "date": "2026-11-23", "machine": {"cpu": "cpu", "cores": 2, "torch": "2.13"},
              "rows": [row]}
    text = report.render_cpu_long_context(record)
    assert "| 8000 | 9.00 (60.00) | 6.67x faster | 39.0 (26.0) | 1.50x |" in text


def test_mixed_batch_prompts_and_report():
    mb = _load("mixed_batch_cpu")
    prompts = mb.batch(list(range(100)), 250, 3)
    assert [len(p) for p in prompts] == [250, 60, 60, 60]
    assert prompts[0][100:200] == list(range(100)) and prompts[2][0] == 20
    report = _load("report")
    text = report.render_cpu_mixed_batch({
        "model": "m", "threads": 2, "repeats": 2, "command": "python benchmarks/mixed_batch_cpu.py",
        "machine": {"cpu": "cpu", "cores": 2}, "versions": {}, "date": "2026-11-23",
        "rows": [{"long_tokens": 6000, "short_prompts": 32, "grouped_s": 13.4, "padded_s": 27.0}]})
    assert "| 6000 | 32 | 13.4 | 27.0 | 2.01x |" in text
