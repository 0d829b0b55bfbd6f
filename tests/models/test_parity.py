"""Every supported architecture against HF transformers on tiny random checkpoints (float32, CPU).

Tolerance: logits agree to rtol 1e-4 with an absolute floor of 1e-4 x max|logit| (summation order
differs between the two implementations; nothing else may)."""

from __future__ import annotations

import pytest
import torch

from turboinfer import LLM, SamplingParams
from tiny_models import full_logits

PROMPT_LENS = [3, 11, 29, 50]


def prompts(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_logits_match_transformers(tiny_model):
    path, hf = tiny_model
    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="64MiB")
    for ids in prompts(hf.config.vocab_size):
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].float()
        ours = full_logits(llm, ids)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_greedy_32_tokens_alone_and_batched(tiny_model, chunked):
    path, hf = tiny_model
    ps = prompts(hf.config.vocab_size)
    expected = [hf_greedy(hf, ids, 32) for ids in ps]
    # A small token budget forces the 29- and 50-token prompts into several prefill chunks.
    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="64MiB",
              max_num_batched_tokens=16 if chunked else 64, enable_chunked_prefill=chunked)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    batched = llm.generate(ps, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in batched] == expected
    for ids, exp in zip(ps, expected):
        alone = llm.generate([ids], params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == exp
    assert llm.engine.kv.num_free_blocks == llm.engine.kv.num_usable_blocks  # nothing leaked


def test_context_past_max_position_embeddings_with_rope_scaling(tmp_path_factory):
    """Linear RoPE scaling lets --max-model-len pass the config's max_position_embeddings (256 here): positions up
    to the served context need rotary tables, which the engine sizes to it. Logits of a 400-token prompt match HF
    (which computes rotary angles on the fly); without scaling the same length is refused with a clear error."""
    from tiny_models import make_tiny_model

    from turboinfer.errors import InvalidRequestError

    path, hf = make_tiny_model(tmp_path_factory, "llama-mha-linearrope")
    llm = LLM(path, dtype="float32", max_model_len=512, kv_cache_memory="64MiB")
    rotary = llm.engine.executor.worker.runner.model.model.layers[0].self_attn.rotary
    assert rotary.cos.shape[0] == 512
    ids = torch.randint(5, hf.config.vocab_size, (400,), generator=torch.Generator().manual_seed(3)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(full_logits(llm, ids), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)[0]
    assert out.outputs[0].token_ids == hf_greedy(hf, ids, 8)
    plain, _ = make_tiny_model(tmp_path_factory, "llama-mqa")
    with pytest.raises(InvalidRequestError, match="exceeds the model's context length"):
        LLM(plain, dtype="float32", max_model_len=512, kv_cache_memory="64MiB")
