"""`turboinfer bench latency` and `bench throughput` end to end on a tiny model, and --load-format dummy."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from turboinfer.bench.cli import main

ENGINE = ["--device", "cpu", "--dtype", "float32", "--num-threads", "1", "--kv-cache-memory", "8MiB"]
RECORD_FIELDS = ("benchmark", "date", "command", "machine", "versions", "config", "engines", "ratios", "model")


def _run(tmp_path, *argv) -> dict:
    path = tmp_path / f"{argv[0]}.json"
    assert main([*argv, *ENGINE, "--json", str(path)]) == 0
    r = json.loads(path.read_text())
    for key in RECORD_FIELDS:
        assert key in r, key
    assert r["command"].startswith(f"turboinfer bench {argv[0]} ")
    assert r["machine"]["cpu"] and r["machine"]["cores"] >= 1 and r["versions"]["torch"]
    return r


def _check_latency(e: dict, num_requests: int, output_len: int) -> None:
    assert e["num_requests"] == num_requests
    assert e["num_output_tokens"] == num_requests * output_len  # EOS is ignored: exactly what was asked
    assert 0 < e["ttft_ms"]["mean"] <= e["e2e_ms"]["mean"]
    assert all(t <= x for t, x in zip(e["samples"]["ttft"], e["samples"]["e2e"]))
    assert e["tpot_ms"]["mean"] > 0 and e["itl_ms"]["count"] == num_requests * (output_len - 1)
    assert e["output_tok_s"] > 0


def test_latency_batch_with_bandwidth_and_plot(tmp_path, tiny_model_dir):
    png = tmp_path / "lat.png"
    r = _run(tmp_path, "latency", "--model", tiny_model_dir, "--batch-size", "2", "--input-len", "8",
             "--output-len", "5", "--num-iters", "2", "--num-iters-warmup", "1", "--plot", str(png))
    assert r["benchmark"] == "bench_latency" and r["config"]["batch_size"] == 2
    ours = r["engines"]["turboinfer"]
    _check_latency(ours, 4, 5)
    assert ours["device"] == "cpu" and ours["dtype"] == "float32"
    bw = ours["bandwidth"]
    # the tiny model: 512x64 embedding + lm_head, 2 layers of 64x(64+16+16+64) attention and 3x64x128 MLP
    assert bw["weight_bytes"] >= 4 * (2 * 512 * 64 + 2 * (64 * 160 + 3 * 64 * 128))
    assert bw["copy_bytes_s"] > 1e8 and 0 < bw["utilization"] < 10
    assert png.stat().st_size > 1000


def test_latency_compare_hf(tmp_path, tiny_model_dir):
    r = _run(tmp_path, "latency", "--model", tiny_model_dir, "--input-len", "6", "--output-len", "4",
             "--num-iters", "2", "--num-iters-warmup", "1", "--compare", "hf", "--no-bandwidth")
    _check_latency(r["engines"]["turboinfer"], 2, 4)
    _check_latency(r["engines"]["transformers"], 2, 4)
    assert set(r["ratios"]["transformers"]) == {"ttft", "tpot", "output_tok_s"}
    assert r["ratios"]["transformers"]["output_tok_s"] > 0


def test_throughput_counts_requested_tokens(tmp_path, tiny_model_dir):
    r = _run(tmp_path, "throughput", "--model", tiny_model_dir, "--num-prompts", "6", "--input-len", "4:12",
             "--output-len", "3:9", "--ignore-eos", "--max-num-seqs", "4", "--compare", "hf", "--hf-batch-size", "4")
    ours = r["engines"]["turboinfer"]
    assert ours["num_requests"] == 6
    assert ours["num_output_tokens"] == ours["num_requested_output_tokens"]
    assert 6 * 3 <= ours["num_output_tokens"] <= 6 * 9 and 6 * 4 <= ours["num_prompt_tokens"] <= 6 * 12
    assert ours["total_tok_s"] == pytest.approx(ours["output_tok_s"] * (1 + ours["num_prompt_tokens"] /
                                                                         ours["num_output_tokens"]))
    assert ours["ttft_ms"]["max"] <= ours["e2e_ms"]["max"]
    hf = r["engines"]["transformers"]
    assert hf["num_output_tokens"] == ours["num_output_tokens"]
    assert hf["num_generated_tokens"] >= hf["num_output_tokens"]
    assert r["ratios"]["transformers"]["output_tok_s"] > 0
    # same seed, same work
    again = _run(tmp_path, "throughput", "--model", tiny_model_dir, "--num-prompts", "6", "--input-len", "4:12",
                 "--output-len", "3:9")
    assert again["engines"]["turboinfer"]["num_prompt_tokens"] == ours["num_prompt_tokens"]


@pytest.mark.parametrize("form", ["dir", "json"])
def test_dummy_load_format_without_weights(tmp_path, tiny_model_dir, form):
    d = tmp_path / "config_only"
    d.mkdir()
    shutil.copy(os.path.join(tiny_model_dir, "config.json"), d / "config.json")
    model = str(d) if form == "dir" else str(d / "config.json")
    r = _run(tmp_path, "throughput", "--model", model, "--load-format", "dummy", "--num-prompts", "3",
             "--input-len", "5", "--output-len", "4")
    ours = r["engines"]["turboinfer"]
    assert ours["load_format"] == "dummy" and ours["num_output_tokens"] == 12


def test_dummy_load_format_reads_no_checkpoint(tmp_path, tiny_model_dir):
    from turboinfer import LLM, SamplingParams
    from turboinfer.errors import InvalidRequestError

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir, d)
    for f in d.glob("*.safetensors"):
        f.write_bytes(b"not a checkpoint")  # would fail to load if it were read
    llm = LLM(str(d), load_format="dummy", device="cpu", kv_cache_memory="8MiB", num_threads=1)
    out = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 3  # the directory's real tokenizer is used
    w = llm.engine.executor.worker.runner.model.model.layers[0].mlp.down_proj.weight
    assert 0.015 < w.std().item() < 0.025
    with pytest.raises(InvalidRequestError, match="load-format"):
        LLM(str(d), load_format="fast")


@pytest.mark.slow
def test_compare_llama_cpp_on_default_model(tmp_path, default_model_path):
    """llama-cpp-python on the same GGUF: batch-1 latency and sequential throughput, ratios printed and stored."""
    pytest.importorskip("llama_cpp")
    r = _run(tmp_path, "latency", "--model", default_model_path, "--input-len", "8", "--output-len", "4",
             "--num-iters", "1", "--compare", "llama.cpp", "--no-bandwidth")
    _check_latency(r["engines"]["llama.cpp"], 1, 4)
    assert r["ratios"]["llama.cpp"]["tpot"] > 0
    r = _run(tmp_path, "throughput", "--model", default_model_path, "--num-prompts", "2", "--input-len", "8",
             "--output-len", "3", "--compare", "llama.cpp")
    lc = r["engines"]["llama.cpp"]
    assert lc["num_generated_tokens"] == lc["num_output_tokens"] == 6


def test_llama_cpp_crash_is_an_error_not_a_segfault(tmp_path, monkeypatch):
    """llama.cpp runs first in a child process: a build that crashes on this machine (its AMX kernels do on some
    virtualized Xeons) gives one clear error naming the signal and the rebuild, and nothing is cached as good."""
    from turboinfer.bench import compare
    from turboinfer.errors import InvalidRequestError

    monkeypatch.setattr(compare, "_probed", set())
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setattr(compare, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    with pytest.raises(InvalidRequestError, match=r"crashed with SIGSEGV .* -DGGML_AMX_INT8=OFF"):
        compare.check_llama_cpp(str(model), 1)
    monkeypatch.setattr(compare, "_PROBE", "raise SystemExit('failed to load model')")
    with pytest.raises(InvalidRequestError, match="could not run .*failed to load model"):
        compare.check_llama_cpp(str(model), 1)
    assert (str(model), 1) not in compare._probed
    monkeypatch.setattr(compare, "_PROBE", "pass")
    compare.check_llama_cpp(str(model), 1)
    assert (str(model), 1) in compare._probed
