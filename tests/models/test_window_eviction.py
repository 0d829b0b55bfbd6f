"""Sliding-window layers give back the blocks that leave their window (kv_cache/manager.py): with a pool sized by
that bound, too small to hold the sequences' every token, greedy generation far past the window still matches HF
transformers token for token, and the pool's byte size is what the estimator says."""

from __future__ import annotations

import pytest
import torch

from test_parity import hf_greedy
from tiny_models import make_tiny_model
from turboinfer import LLM, SamplingParams
from turboinfer.kv_cache.spec import SLIDING
from turboinfer.memory import estimate_inference

BLOCK, CHUNK, MAX_LEN = 8, 16, 128


@pytest.mark.parametrize("name", ["mistral-window", "gemma3-window-softcap"])
def test_evicting_window_layers_match_transformers(tmp_path_factory, name):
    path, hf = make_tiny_model(tmp_path_factory, name)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(5, hf.config.vocab_size, (n,), generator=g).tolist() for n in (50, 37)]
    expected = [hf_greedy(hf, ids, 60) for ids in prompts]
    llm = LLM(path, dtype="float32", block_size=BLOCK, max_num_batched_tokens=CHUNK, max_model_len=MAX_LEN,
              max_num_seqs=2)
    info = llm.engine.info
    sliding = [gr for gr in info.kv_cache_groups if gr.spec.kind == SLIDING]
    assert sliding
    for gr in sliding:  # room for the windows, not for every token: without eviction these would not fit
        assert gr.num_blocks - 1 < sum(-(-(len(p) + 60) // BLOCK) for p in prompts)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.engine.scheduler.num_preemptions == 0
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_usable_blocks
    # the pool the engine allocated is the estimator's figure for 2 sequences, to the byte
    arch = llm.engine.executor.worker.arch
    est = estimate_inference(arch, dtype="float32", max_model_len=MAX_LEN, max_num_seqs=2,
                             max_num_batched_tokens=CHUNK, block_size=BLOCK, device="cpu")
    assert est.kv_cache == info.kv_cache_bytes
