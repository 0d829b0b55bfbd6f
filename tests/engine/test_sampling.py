"""Sampling parameters do what they say, checked against distributions computed here independently."""

from __future__ import annotations

import math

import pytest
import torch

from turboinfer import SamplingParams
from turboinfer.runner.request_state import RequestState
from turboinfer.errors import InvalidRequestError
from turboinfer.runner.sampler import Sampler

PROMPTS = [[5, 6, 7], [40, 41, 42, 43, 44, 45], [100] * 12]


def state(rid: str, prompt: list[int], params: SamplingParams) -> RequestState:
    return RequestState(rid, list(prompt), len(prompt), params, frozenset(), [[]])


def sample_many(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    sampler = Sampler(torch.device("cpu"), seed=0)
    reqs = [state(str(i), [1], params) for i in range(n)]
    tokens, _ = sampler(logits.expand(n, -1).contiguous(), reqs)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / n


LOGITS = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])


def test_temperature_sampling_matches_softmax():
    freq = sample_many(LOGITS, SamplingParams(temperature=0.7))
    expected = (LOGITS[0] / 0.7).softmax(-1)
    assert torch.allclose(freq, expected, atol=0.03)


def test_top_k_top_p_min_p_restrict_support():
    assert sample_many(LOGITS, SamplingParams(temperature=1.0, top_k=2))[2:].sum() == 0
    probs = LOGITS[0].softmax(-1)  # [0.56, 0.21, 0.12, 0.08, ...]; top_p=0.7 keeps the first two
    freq = sample_many(LOGITS, SamplingParams(temperature=1.0, top_p=0.7))
    assert freq[2:].sum() == 0 and abs(freq[0] - probs[0] / probs[:2].sum()) < 0.03
    freq = sample_many(LOGITS, SamplingParams(temperature=1.0, min_p=0.3))  # keeps p >= 0.3 * 0.56
    assert freq[(probs < 0.3 * probs[0])].sum() == 0 and freq[1] > 0


def test_penalties():
    logits = torch.tensor([[1.0, 1.0, -1.0, 0.5]])
    req = state("r", [0], SamplingParams(temperature=0, repetition_penalty=2.0))
    req.token_ids.append(2)
    tokens, _ = Sampler(torch.device("cpu"))(logits.clone(), [req])
    assert tokens == [1]  # token 0 (in the prompt) halved to 0.5; token 1 wins
    req = state("r", [3], SamplingParams(temperature=0, frequency_penalty=0.3, presence_penalty=0.5))
    req.token_ids += [0, 0]
    tokens, _ = Sampler(torch.device("cpu"))(logits.clone(), [req])
    assert tokens == [1]  # token 0: 1.0 - 2 * 0.3 - 0.5 < 1.0


def test_seed_reproducible_alone_and_batched(llm):
    p = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate(PROMPTS + [PROMPTS[0]], [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),
                                                  SamplingParams(temperature=0.8, seed=7, max_tokens=20),
                                                  SamplingParams(temperature=0, max_tokens=20), p],
                         use_tqdm=False)
    assert batch[3].outputs[0].token_ids == alone
    other = llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True),
                         use_tqdm=False)[0].outputs[0].token_ids
    assert other != alone


def test_n_completions_distinct_and_share_prefix(llm):
    out = llm.generate([PROMPTS[1]], SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3
    assert all(len(c.token_ids) == 16 for c in out.outputs)


def test_logprobs_are_model_log_softmax(llm):
    from tiny_models import full_logits

    prompt = PROMPTS[1]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, logprobs=4, prompt_logprobs=2,
                                                ignore_eos=True), use_tqdm=False)[0]
    c = out.outputs[0]
    ref = full_logits(llm, prompt + c.token_ids).log_softmax(-1)
    for i, (tok, lp) in enumerate(zip(c.token_ids, c.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert lp[tok].rank == 1  # greedy picks the top token
        assert math.isclose(lp[tok].logprob, row[tok].item(), rel_tol=1e-4, abs_tol=1e-4)
        top = row.topk(4)
        assert set(lp) == set(top.indices.tolist())
    assert math.isclose(c.cumulative_logprob, sum(lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)),
                        abs_tol=1e-4)
    pl = out.prompt_logprobs
    assert pl[0] is None and len(pl) == len(prompt)
    for i in range(1, len(prompt)):
        tok = prompt[i]
        assert math.isclose(pl[i][tok].logprob, ref[i - 1, tok].item(), rel_tol=1e-4, abs_tol=1e-4)
        assert pl[i][tok].rank == int((ref[i - 1] > ref[i - 1, tok]).sum()) + 1
        assert len(pl[i]) <= 3


def test_stop_token_ids_and_max_tokens(llm):
    base = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    stop_id = base.token_ids[4]
    first = base.token_ids.index(stop_id)
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                                                    stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_stop_string_truncates_text(llm):
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                     skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop=stop,
                                                    skip_special_tokens=False), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


@pytest.mark.parametrize("kwargs, field", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_k=-5), "top_k"),
    (dict(max_tokens=0), "max_tokens"), (dict(n=0), "n"), (dict(min_p=2), "min_p"),
    (dict(presence_penalty=5), "presence_penalty"), (dict(logprobs=50), "logprobs"),
])
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)
