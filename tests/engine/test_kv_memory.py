"""The CPU KV pool reads as zeros and becomes resident only where requests have written it."""

from __future__ import annotations

import mmap

import pytest
import torch

from turboinfer import LLM, SamplingParams
from turboinfer.runner.kv_alloc import resident_bytes, zeroed

PAGE = mmap.PAGESIZE


def test_zeroed_reads_zero_and_is_resident_only_where_written():
    t = zeroed((1024, 16, 2, 64), torch.bfloat16, torch.device("cpu"))  # 4 MiB, 4 KiB a block
    assert t.shape == (1024, 16, 2, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert t.data_ptr() % PAGE == 0
    assert resident_bytes([t]) == 0
    t[10:20] = 1.5  # ten 4 KiB blocks
    written = 10 * t[0].numel() * t.element_size()
    assert written <= resident_bytes([t]) <= written + 2 * PAGE
    # Reading counts as resident too (some kernels back a read fault with a page of its own), so look last.
    assert t[10:20].eq(1.5).all() and not t[:10].any() and not t[20:].any()
    s = zeroed((7, 3), torch.float32, torch.device("cpu"))  # a size that is not a page multiple
    s.fill_(2.0)
    assert s.sum().item() == 42.0 and resident_bytes([s]) == PAGE


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_engine_pool_grows_with_use(tiny_llama, kv_dtype):
    llm = LLM(tiny_llama[0], dtype="float32", max_model_len=256, kv_cache_memory="64MiB", block_size=8,
              kv_cache_dtype=kv_dtype)
    runner = llm.engine.executor.worker.runner
    pool = runner.kv_cache_bytes()
    assert pool > 60 * 2**20
    assert runner.kv_cache_resident_bytes() <= 64 * PAGE  # nothing written yet but what warm-up touches
    outs = llm.generate([list(range(5, 105))] * 4, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                        use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 20 for o in outs)
    after = runner.kv_cache_resident_bytes()
    num_tensors = sum(t is not None for group in runner.kv_caches for t in group)
    assert 0 < after <= 120 * runner.kv_cache_bytes() // (llm.engine.info.kv_cache_groups[0].num_blocks - 1) + num_tensors * PAGE
    assert after < pool // 8
