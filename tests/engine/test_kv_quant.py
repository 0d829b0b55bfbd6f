"""Quantized KV cache: round-trip error bounds, capacity, and end-to-end agreement with the float cache."""

from __future__ import annotations

import pytest
import torch

from turboinfer import LLM, SamplingParams
from turboinfer.kernels.torch_ref.attention import QMAX, _gather, store_kv
from tiny_models import full_logits


@pytest.mark.parametrize("dtype", [torch.int8, torch.float8_e4m3fn])
def test_store_and_gather_round_trip(dtype):
    torch.manual_seed(0)
    nb, bs, kvh, d = 6, 4, 2, 16
    k_cache, v_cache = torch.zeros(nb, bs, kvh, d, dtype=dtype), torch.zeros(nb, bs, kvh, d, dtype=dtype)
    k_scale, v_scale = torch.zeros(nb, bs, kvh), torch.zeros(nb, bs, kvh)
    key = torch.randn(10, kvh, d) * torch.linspace(0.1, 10, 10)[:, None, None]  # very different token ranges
    value = torch.randn(10, kvh, d)
    table = torch.tensor([3, 1, 5])
    slots = torch.cat([table[:, None] * bs + torch.arange(bs)]).flatten()[:10]
    store_kv(key, value, k_cache, v_cache, slots, k_scale, v_scale)
    for cache, scale, x in ((k_cache, k_scale, key), (v_cache, v_scale, value)):
        back = _gather(cache, scale, table, 10)
        amax = x.abs().amax(-1, keepdim=True)
        if dtype == torch.int8:  # rounding error at most half a step of each token's own scale
            assert ((back - x).abs() <= amax / QMAX[dtype] / 2 + 1e-6).all()
        else:  # e4m3 keeps 3 mantissa bits: relative error <= 2^-4 of each value, plus subnormal slack
            assert ((back - x).abs() <= x.abs() / 16 + amax / QMAX[dtype] * 2**-6).all()


def test_int8_cache_doubles_capacity_and_tracks_float(tiny_llama):
    path = tiny_llama[0]
    base = LLM(path, dtype="float32", max_model_len=128, kv_cache_memory="4MiB")
    q8 = LLM(path, dtype="float32", max_model_len=128, kv_cache_memory="4MiB", kv_cache_dtype="int8")
    # head_dim 16: float32 K/V take 64 bytes per head, int8 16 + a 4-byte scale
    assert q8.engine.info.kv_cache_groups[0].num_blocks - 1 >= 3 * (base.engine.info.kv_cache_groups[0].num_blocks - 1)
    ids = list(range(5, 70))
    ref, got = full_logits(base, ids), full_logits(q8, ids)
    # prefill attends over the quantized cache, so every position is affected; errors stay small
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9
    # and the decode path (one token at a time over the quantized cache) starts out the same
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    a = base.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids
    b = q8.generate([ids], greedy, use_tqdm=False)[0].outputs[0].token_ids
    assert a == b
