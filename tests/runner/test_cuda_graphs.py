"""Decode over the CUDA-graph buffers (runner/cuda_graphs.py). Without CUDA the same buffers run eagerly
(capture=False): padding rows, bucket choice, slot and block-table staging are checked against the plain
PyTorch step; with CUDA the graphs are captured and replayed for real."""

from __future__ import annotations

import pytest
import torch

from tiny_models import make_tiny_model
from turboinfer import LLM, SamplingParams
from turboinfer.runner.cuda_graphs import DecodeGraphs

PROMPTS = ["The quick brown fox", "Paris is the capital of France. Hello, world! How are", "def f"]


def generate(llm, n=24):
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=2)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = torch.tensor([[s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs])
    return tokens, lps


class Spy:
    """A decode backend that records each batch size, then runs the graphs' buffers."""

    def __init__(self, graphs, calls):
        self.graphs, self.calls, self.max_batch = graphs, calls, graphs.max_batch

    def __call__(self, batch):
        self.calls.append(batch.size)
        return self.graphs(batch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory, "mistral-window")[0]


def test_graph_buffers_match_eager_step(tiny):
    llm = LLM(tiny, dtype="float32", max_model_len=128, kv_cache_memory="8MiB", enable_prefix_caching=False)
    runner = llm.engine.executor.worker.runner
    ref_tokens, ref_lps = generate(llm)
    graphs = DecodeGraphs(runner.model, runner.ops, runner.block_size, 4, 128, runner.windows, runner.device,
                          runner.dtype, capture=False)
    assert graphs.buckets == [1, 2, 4]
    calls = []
    runner.decode_graphs = Spy(graphs, calls)
    tokens, lps = generate(llm)  # 3 sequences: bucket 4, one padding row
    assert calls and set(calls) == {3}
    assert tokens == ref_tokens
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=1e-5)
    # the padding row wrote only into the null block: a fresh run still matches
    tokens, _ = generate(llm)
    assert tokens == ref_tokens


def test_more_sequences_than_the_largest_bucket_run_eagerly(tiny):
    llm = LLM(tiny, dtype="float32", max_model_len=128, kv_cache_memory="8MiB", enable_prefix_caching=False)
    runner = llm.engine.executor.worker.runner
    ref_tokens, _ = generate(llm, n=8)
    calls = []
    graphs = DecodeGraphs(runner.model, runner.ops, runner.block_size, 2, 128, runner.windows, runner.device,
                          runner.dtype, capture=False)
    runner.decode_graphs = Spy(graphs, calls)
    tokens, _ = generate(llm, n=8)
    assert tokens == ref_tokens
    assert calls == []  # 3 decodes > max bucket 2: the ordinary step ran


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_captured_graphs_match_eager_on_gpu(tiny):
    kw = dict(dtype="bfloat16", device="cuda", max_model_len=128, kv_cache_memory="64MiB",
              enable_prefix_caching=False, max_num_seqs=8)
    eager = LLM(tiny, enforce_eager=True, **kw)
    graphed = LLM(tiny, **kw)
    assert graphed.engine.executor.worker.runner.decode_graphs is not None and graphed.engine.executor.worker.runner.decode_graphs.graphs
    ref_tokens, ref_lps = generate(eager)
    tokens, lps = generate(graphed)
    assert tokens == ref_tokens
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=2e-2)  # bf16; same kernels, same order
