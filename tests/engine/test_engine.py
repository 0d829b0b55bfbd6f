"""Engine behaviour on a tiny real checkpoint: preemption, prefix caching, abort, bad input."""

from __future__ import annotations

import pytest
import torch

from turboinfer import LLM, SamplingParams
from turboinfer.errors import InvalidRequestError

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def rand_prompts(n: int, lo: int, hi: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 500, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def assert_no_leak(llm: LLM) -> None:
    eng = llm.engine
    assert not eng.has_unfinished()
    assert eng.kv.num_free_blocks == eng.kv.num_usable_blocks
    assert eng.kv.num_requests == 0


def test_preemption_keeps_outputs_and_frees_blocks(tiny_llama, llm):
    prompts = rand_prompts(8, 10, 40)
    expected = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    # 12 blocks of 8 tokens cannot hold 8 sequences of up to 64 tokens: the scheduler must preempt.
    small = LLM(tiny_llama[0], dtype="float32", block_size=8, num_gpu_blocks_override=12, max_model_len=96,
                enable_prefix_caching=False)
    outs = small.generate(prompts, GREEDY, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert_no_leak(small)


def test_prefix_cache_reuses_shared_prefix(llm):
    eng = llm.engine
    shared = rand_prompts(1, 64, 65, seed=3)[0]  # 8 full blocks of 8
    first = llm.generate([shared + [7, 8, 9]], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0 or first.num_cached_tokens < 64
    computed = []
    orig = eng.executor.execute

    def spy(sched):
        computed.append(sched.num_batched_tokens)
        return orig(sched)

    eng.executor.execute = spy
    try:
        second = llm.generate([shared + [11, 12, 13, 14]], GREEDY, use_tqdm=False)[0]
    finally:
        eng.executor.execute = orig
    assert second.num_cached_tokens == 64
    # prefill computes only the 4 new tokens, then one token per decode step
    assert computed[0] == 4 and all(c == 1 for c in computed[1:])
    # and the reuse does not change the result
    eng.reset_prefix_cache()
    fresh = llm.generate([shared + [11, 12, 13, 14]], GREEDY, use_tqdm=False)[0]
    assert fresh.num_cached_tokens == 0
    assert fresh.outputs[0].token_ids == second.outputs[0].token_ids
    assert_no_leak(llm)


def test_abort_frees_blocks(llm):
    eng = llm.engine
    rid = eng.add_request(rand_prompts(1, 30, 31)[0], SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.num_requests
    eng.abort(rid)
    assert_no_leak(llm)


def test_stream_close_aborts(llm):
    gen = llm.stream([5, 6, 7, 8], SamplingParams(max_tokens=40, ignore_eos=True))
    next(gen)
    next(gen)
    gen.close()
    assert_no_leak(llm)


def test_many_requests_continuous_batching(llm):
    prompts = rand_prompts(20, 1, 60, seed=5)
    batched = llm.generate(prompts, GREEDY, use_tqdm=False)
    for p, out in zip(prompts[:4], batched[:4]):
        assert llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids == out.outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 24 for o in batched)
    assert_no_leak(llm)


def test_prompt_too_long_is_rejected_cleanly(llm):
    with pytest.raises(InvalidRequestError, match=r"max_model_len\) is 256"):
        llm.generate([list(range(5, 300))], GREEDY)
    with pytest.raises(InvalidRequestError, match="empty"):
        llm.generate([""], GREEDY)
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        llm.generate([[1, 2, 10**6]], GREEDY)
    assert_no_leak(llm)


def test_generation_stops_at_context_end(tiny_llama):
    small = LLM(tiny_llama[0], dtype="float32", max_model_len=32, kv_cache_memory="8MiB")
    out = small.generate([list(range(5, 25))], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 12 and out.outputs[0].finish_reason == "length"
