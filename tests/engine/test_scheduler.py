"""The engine, scheduler and KV manager over a fake executor: pure Python, no torch, no model.

The fake worker knows only what the step contract tells it (engine/batch.py): it rebuilds each request's tokens
and block tables from NewRequestData / CachedRequestData, checks that the tables cover every row it is asked to
compute, and "samples" the next token as (last token + 1) mod vocab, so every output is predictable."""

from __future__ import annotations

import pickle

import pytest

from turboinfer.config import EngineConfig
from turboinfer.engine.batch import ModelOutput, SchedulerOutput, SeqResult
from turboinfer.engine.engine import Engine
from turboinfer.engine.executor import EngineInfo
from turboinfer.errors import InvalidRequestError
from turboinfer.kv_cache.spec import FULL, SLIDING, KVCacheGroup, KVCacheSpec
from turboinfer.sampling_params import SamplingParams

VOCAB = 1000
BS = 4


class Tokenizer:
    eos_token_ids = frozenset()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) % VOCAB for c in text]

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return "".join(chr(32 + i % 90) for i in ids)


class FakeExecutor:
    def __init__(self, groups: list[KVCacheGroup], max_model_len: int = 256) -> None:
        self.info = EngineInfo(
            model="fake", path="", model_format="hf_dir", architecture="Fake", dtype="float32", device="cpu",
            max_model_len=max_model_len, vocab_size=VOCAB, eos_token_ids=frozenset({VOCAB - 1}), block_size=BS,
            kv_cache_groups=tuple(groups), kv_cache_bytes=0, weight_bytes=0, load_seconds=0.0, num_packed_layers=0,
            decode_path="")
        self.tokenizer = Tokenizer()
        self.tokens: dict[str, list[int]] = {}
        self.tables: dict[str, list[list[int]]] = {}
        self.steps: list[SchedulerOutput] = []

    def execute(self, sched: SchedulerOutput) -> ModelOutput:
        sched = pickle.loads(pickle.dumps(sched))  # everything crossing the seam survives another process
        self.steps.append(sched)
        for rid in sched.finished_ids + sched.preempted_ids:
            self.tables.pop(rid, None)
        for rid in sched.finished_ids:
            self.tokens.pop(rid, None)
        for new in sched.new_requests:
            self.tokens[new.request_id] = list(new.token_ids)
            self.tables[new.request_id] = [list(t) for t in new.block_ids]
        for diff in sched.cached_requests:
            self.tokens[diff.request_id] += diff.new_token_ids
            for table, ids in zip(self.tables[diff.request_id], diff.new_block_ids):
                table.extend(ids)
        results = []
        for s in sched.seqs:
            tokens = self.tokens[s.request_id]
            assert s.end_pos <= len(tokens)
            for g, table in zip(self.info.kv_cache_groups, self.tables[s.request_id]):
                assert len(table) * BS >= s.end_pos, "the block table must cover every row computed"
                first_read = 0 if g.spec.kind == FULL else max(0, s.start_pos - g.spec.sliding_window + 1) // BS
                assert 0 not in table[first_read:-(-s.end_pos // BS)], "a row a query reads sits in a freed block"
            results.append(SeqResult([(tokens[s.end_pos - 1] + 1) % VOCAB] if s.sample else []))
        return ModelOutput(results)

    def kv_cache_resident_bytes(self):
        return None

    def shutdown(self):
        pass


def full(num_blocks: int) -> KVCacheGroup:
    return KVCacheGroup(KVCacheSpec(FULL, 1, 8, "float32"), (0, 1), num_blocks)


def engine(groups=None, **kw) -> tuple[Engine, FakeExecutor]:
    ex = FakeExecutor(groups or [full(64)], max_model_len=kw.pop("max_model_len", 256))
    cfg = EngineConfig(**{"max_num_seqs": 4, "max_num_batched_tokens": 16, **kw})
    return Engine(cfg, executor=ex), ex


def run(eng: Engine) -> dict[str, list[int]]:
    out = {}
    while eng.has_unfinished():
        for o in eng.step():
            if o.finished:
                out[o.request_id] = o.outputs[0].token_ids
    return out


def expected(prompt: list[int], n: int) -> list[int]:
    return [(prompt[-1] + 1 + i) % VOCAB for i in range(n)]


def assert_clean(eng: Engine) -> None:
    assert eng.kv.num_free_blocks == eng.kv.num_usable_blocks and eng.kv.num_requests == 0


def test_admission_chunking_and_diffs():
    eng, ex = engine()
    prompts = [list(range(10 * i + 1, 10 * i + 1 + 10 + 7 * i)) for i in range(6)]
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=5, ignore_eos=True))
    out = run(eng)
    assert [out[f"req-{i}"] for i in range(6)] == [expected(p, 5) for p in prompts]
    for s in ex.steps:
        assert s.num_batched_tokens == sum(q.num_new_tokens for q in s.seqs) <= 16
        assert len(s.seqs) <= 4
        assert [q.is_decode for q in s.seqs] == sorted((q.is_decode for q in s.seqs), reverse=True)
    # once a request is running the worker gets only the one token it sampled last step
    diffs = [d for s in ex.steps for d in s.cached_requests]
    assert diffs and all(len(d.new_token_ids) <= 1 for d in diffs)
    assert sum(len(s.new_requests) for s in ex.steps) == 6  # each sent in full exactly once (no preemption)
    assert_clean(eng)
    eng.add_request([1, 2], SamplingParams(max_tokens=1))  # the last finish travels with the next step
    run(eng)
    assert {rid for s in ex.steps for rid in s.finished_ids} == {f"req-{i}" for i in range(6)}
    assert set(ex.tokens) == {"req-6"}


def test_preemption_resends_the_request_and_keeps_its_output():
    eng, ex = engine([full(9)], max_num_seqs=4, max_num_batched_tokens=32)  # 8 usable blocks of 4
    prompts = [list(range(i * 50 + 1, i * 50 + 12)) for i in range(3)]
    for p in prompts:
        eng.add_request(p, SamplingParams(max_tokens=8, ignore_eos=True))
    out = run(eng)
    assert eng.scheduler.num_preemptions > 0
    assert [out[f"req-{i}"] for i in range(3)] == [expected(p, 8) for p in prompts]
    resent = []
    for i, step in enumerate(ex.steps):
        for rid in step.preempted_ids:
            resent.append(next(n for s in ex.steps[i + 1:] for n in s.new_requests if n.request_id == rid))
    assert resent and all(len(n.token_ids) > n.num_prompt_tokens for n in resent)  # resumed with its outputs
    assert_clean(eng)


def test_prefix_hit_shares_blocks_and_computes_only_the_rest():
    eng, ex = engine()
    shared = list(range(1, 17))  # 4 full blocks
    eng.add_request(shared + [90], SamplingParams(max_tokens=2, ignore_eos=True))
    run(eng)
    eng.add_request(shared + [91, 92], SamplingParams(max_tokens=2, ignore_eos=True), request_id="second")
    first_step = len(ex.steps)
    out = run(eng)
    assert out["second"] == expected([92], 2)
    new = next(n for n in ex.steps[first_step].new_requests if n.request_id == "second")
    seq = next(s for s in ex.steps[first_step].seqs if s.request_id == "second")
    assert seq.start_pos == 16 and seq.num_new_tokens == 2 and len(new.block_ids[0]) == 5
    eng.reset_prefix_cache()
    eng.add_request(shared + [91, 92], SamplingParams(max_tokens=1), request_id="third")
    step = len(ex.steps)
    run(eng)
    assert ex.steps[step].seqs[0].start_pos == 0
    assert_clean(eng)


def test_abort_frees_blocks_and_tells_the_worker():
    eng, ex = engine()
    rid = eng.add_request(list(range(1, 30)), SamplingParams(max_tokens=50, ignore_eos=True))
    eng.step()
    eng.step()
    assert eng.kv.num_requests == 1
    eng.abort(rid)
    assert_clean(eng)
    eng.add_request([5, 6], SamplingParams(max_tokens=1))
    eng.step()
    assert rid in ex.steps[-1].finished_ids and rid not in ex.tables


def test_sliding_window_blocks_stay_bounded():
    groups = [full(200), KVCacheGroup(KVCacheSpec(SLIDING, 1, 8, "float32", 8), (2, 3), 200)]
    eng, ex = engine(groups, max_num_batched_tokens=8)
    prompt = list(range(1, 41))
    eng.add_request(prompt, SamplingParams(max_tokens=60, ignore_eos=True))
    live = []
    while eng.has_unfinished():
        eng.step()
        live.append([p.num_usable_blocks - p.num_free_blocks for p in eng.kv.pools])
    full_live, sliding_live = zip(*live)
    assert max(full_live) == 25  # 100 rows
    bound = groups[1].spec.max_blocks_per_seq(256, BS, 8)
    assert max(sliding_live) <= bound == 5  # window 8 + a step's 8 new rows: at most 5 blocks of 4
    assert_clean(eng)


def test_validation_names_the_parameter():
    eng, _ = engine(max_model_len=32)
    cases = [([], SamplingParams(), "prompt"), ([VOCAB], SamplingParams(), "prompt"),
             (list(range(1, 40)), SamplingParams(), "prompt"),
             ([1, 2], SamplingParams(stop_token_ids=[VOCAB + 5]), "stop_token_ids")]
    for prompt, params, param in cases:
        with pytest.raises(InvalidRequestError) as e:
            eng.add_request(prompt, params)
        assert e.value.param == param
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(top_p=2.0)
    assert e.value.param == "top_p"
    eng.add_request([1, 2], SamplingParams(max_tokens=1), request_id="x")
    with pytest.raises(InvalidRequestError) as e:
        eng.add_request([1, 2], SamplingParams(max_tokens=1), request_id="x")
    assert e.value.param == "request_id"
    run(eng)
    assert_clean(eng)
