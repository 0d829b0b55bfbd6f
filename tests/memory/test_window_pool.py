"""Gemma 3 270M at a 32k context: 15 of its 18 layers slide over 512 tokens, so the engine's KV pool holds about a
fifth of what 18 full layers would, and `turboinfer estimate` says the same number of bytes."""

from __future__ import annotations

import json

import pytest

from turboinfer.loader.resolve import ALIASES, cache_dir

REAL = cache_dir() / "gemma3-270m" / ALIASES["gemma3-270m"].member


@pytest.mark.skipif(not REAL.is_file(), reason="gemma3-270m is not in the cache (turboinfer pull is not run by tests)")
def test_gemma3_32k_pool_equals_the_estimate(capsys):
    from turboinfer import LLM
    from turboinfer.cli import main
    from turboinfer.kv_cache.spec import SLIDING

    llm = LLM("gemma3-270m", dtype="bfloat16", max_model_len=32768, max_num_seqs=1, load_format="dummy")
    info = llm.engine.info
    sliding = [g for g in info.kv_cache_groups if g.spec.kind == SLIDING]
    assert [len(g.layer_ids) for g in info.kv_cache_groups] == [3, 15] and sliding[0].spec.sliding_window == 512
    assert main(["estimate", "gemma3-270m", "--max-model-len", "32768", "--dtype", "bfloat16", "--device", "cpu",
                 "--json"]) == 0
    est = json.loads(capsys.readouterr().out)
    assert est["kv_cache"] == info.kv_cache_bytes
    # every layer's 1 KV head of 256 values, K and V in bf16: 1,024 bytes a token; 18 full layers would take
    all_full = 18 * (32768 // 16 + 1) * 16 * 1024
    assert 0.19 < info.kv_cache_bytes / all_full < 0.2
