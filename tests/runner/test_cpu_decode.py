"""The C decode step (runner/cpu_decode.py + kernels/cpu/decode.c) against the PyTorch path.

Oracle: the same model whose packed int4 layers compute in float32 from a dense copy of exactly the packed codes
and bf16 scales the C code reads (DenseTwin). In float32 the two paths then differ only in summation order, so
log-probabilities must agree to 2e-4 and greedy tokens exactly. In bfloat16 the PyTorch path rounds every
activation to bf16 while the C path keeps float32 (only the KV cache is bf16), so there the bar is bf16-sized."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tiny_models import make_tiny_model
from turboinfer import LLM, SamplingParams
from turboinfer.kernels import cpu as cpu_kernels
from turboinfer.layers.quantization.q4 import Int4CPUMethod
from turboinfer.runner import cpu_decode
from turboinfer.runner.decode_backend import DecodeBatch

PROMPTS = ["The quick brown fox", "Paris is the capital of France. Hello, world! How are", "def f"]
# Layer widths multiples of 64; head sizes 16 (general loop), 64 and 128 (register-tiled attention, 2 and 4 query
# heads per KV head).
ARCHS = ["llama-gqa-llama3rope-tied", "mistral-window", "qwen2-bias", "llama-hd64", "llama-mqa-hd128"]

pytestmark = pytest.mark.skipif(cpu_kernels.load_library() is None, reason="no C compiler for the CPU kernels")


def unpack_int4(m: Int4CPUMethod) -> torch.Tensor:
    """Dense float32 [N, K] from torch's CPU int4 packing: bytes [N/64, K, 32], low nibble row j, high j+32."""
    sz = m.scales_zeros.float()  # [K / g, N, 2]
    n, k = m.out_features, sz.shape[0] * m.group_size
    b = m.packed.view(torch.uint8).reshape(n // 64, k, 32)
    q = torch.stack([b & 15, b >> 4], dim=2).permute(0, 2, 3, 1).reshape(n, k).float()
    s = sz[..., 0].t().repeat_interleave(m.group_size, 1)
    z8 = sz[..., 1].t().repeat_interleave(m.group_size, 1)
    return (q - 8) * s + z8


class DenseTwin(Int4CPUMethod):
    """Still an Int4CPUMethod (so the C step accepts the layer), but the PyTorch path computes in float32."""

    def __init__(self, src: Int4CPUMethod) -> None:
        self.__dict__.update(src.__dict__)
        self.dense = unpack_int4(src)
        if src.input_scale is not None:  # AWQ: (x * s) W^T = x (W * s)^T
            self.dense = self.dense * src.input_scale.float()

    def apply(self, layer, x):
        bias = None if layer.bias is None else layer.bias.float()
        return F.linear(x.float(), self.dense, bias).to(x.dtype)


def load(path: str, dtype: str, **kw) -> LLM:
    llm = LLM(path, dtype=dtype, quantization="int4", quant_group_size=32, max_model_len=256,
              kv_cache_memory="16MiB", num_threads=2, enable_prefix_caching=False, **kw)
    for mod in llm.engine.executor.worker.runner.model.modules():
        if isinstance(getattr(mod, "quant_method", None), Int4CPUMethod):
            mod.quant_method = DenseTwin(mod.quant_method)
    return llm


def run(llm: LLM, use_c: bool, decoder, n: int = 40):
    llm.engine.executor.worker.runner.cpu_decoder = decoder if use_c else None
    sp = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3)
    outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in outs]
    lps = torch.tensor([[step[t].logprob for step, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                        for o in outs])
    return tokens, lps


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    return make_tiny_model(tmp_path_factory, request.param)[0]


def test_c_step_equals_float32_reference(tiny):
    llm = load(tiny, "float32")
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None, cpu_decode.accepts(llm.engine.executor.worker.runner.model, torch.float32, torch.float32)
    ref_tokens, ref_lps = run(llm, False, dec)
    tokens, lps = run(llm, True, dec)
    assert tokens == ref_tokens
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=2e-4)


def test_c_step_with_awq_input_scales(tiny):
    llm = load(tiny, "float32", awq=True)
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None
    assert llm.engine.executor.worker.runner.model.model.layers[0].mlp.down_proj.quant_method.input_scale is not None
    ref_tokens, ref_lps = run(llm, False, dec)
    tokens, lps = run(llm, True, dec)
    assert tokens == ref_tokens
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=2e-4)


def test_c_step_with_int8_kv_cache(tiny):
    """int8 K/V: both paths quantize per (token, head) the same way; a K/V value computed in another summation
    order can land on the other side of a rounding boundary, one code step (max|x| / 127) apart: rare (mean
    difference bounded as in float32) but visible in a single step (max bounded at 1e-2)."""
    llm = load(tiny, "float32", kv_cache_dtype="int8")
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None
    ref_tokens, ref_lps = run(llm, False, dec)
    tokens, lps = run(llm, True, dec)
    assert tokens == ref_tokens
    diff = (lps - ref_lps).abs()
    assert diff.mean().item() < 2e-4 and diff.max().item() < 1e-2


def test_c_step_in_bfloat16(tiny):
    llm = load(tiny, "bfloat16")
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None
    ref_tokens, ref_lps = run(llm, False, dec, n=12)
    tokens, lps = run(llm, True, dec, n=12)
    # Random tiny models have near-ties that bf16 rounding on one side can flip, so compare the steps up to
    # the first differing token (the same context on both sides).
    for t, rt, lp, rlp in zip(tokens, ref_tokens, lps, ref_lps):
        same = next((i for i, (a, b) in enumerate(zip(t, rt)) if a != b), len(t))
        assert same >= 3
        assert (lp[:same + 1] - rlp[:same + 1]).abs().max().item() < 0.1


def test_portable_build_matches_vectorised(tmp_path_factory):
    """The plain-C fallback (built with AVX-512 off) gives the same logits as the vectorised build."""
    from turboinfer.bench.probe import prefill, probe_request
    from turboinfer.engine.batch import ScheduledSeq

    path = make_tiny_model(tmp_path_factory, "llama-gqa-llama3rope-tied")[0]
    llm = load(path, "float32")
    runner = llm.engine.executor.worker.runner
    fast = runner.cpu_decoder
    portable_lib = cpu_kernels.load_library(("-mno-avx512f",))
    assert portable_lib is not None
    portable = cpu_decode.CPUDecoder(portable_lib, runner.model, torch.float32, runner.block_size,
                                     int(fast.dims[cpu_decode.DIMS.index("max_seq")]))
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    with probe_request(llm, ids + [7], len(ids) + 1):
        prefill(runner, len(ids))  # the prompt's K/V into the cache
        # Each call writes the new token's K/V into the same slot, with the same values.
        batch = runner.decode_batch([ScheduledSeq("probe", len(ids), 1, True, False)])
        torch.testing.assert_close(portable(batch), fast(batch), rtol=1e-5, atol=1e-5)


def test_positions_are_not_rows(tiny):
    """The new token's K/V go to row seq_lens - 1 whatever its position (KV eviction and SUBLLM make the two
    differ): with positions shifted past the rows, the C step equals the PyTorch path given the same batch."""
    from turboinfer.bench.probe import PROBE, prefill, probe_request
    from turboinfer.runner.cuda_graphs import DecodeGraphs

    llm = load(tiny, "float32")
    runner = llm.engine.executor.worker.runner
    dec = runner.cpu_decoder
    eager = DecodeGraphs(runner.model, runner.ops, runner.block_size, 1, 64, runner.windows, torch.device("cpu"),
                         torch.float32, capture=False)
    ids = llm.get_tokenizer().encode(PROMPTS[0])
    n = len(ids)
    with probe_request(llm, ids + [7], n + 1):
        prefill(runner, n)
        tables = [[runner.requests[PROBE].block_ids[0]]]  # one KV group, one sequence
        shifted = DecodeBatch.build([7], [n + 9], [n], tables, runner.block_size)
        same = DecodeBatch.build([7], [n], [n], tables, runner.block_size)
        got, want = dec(shifted), eager(shifted)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-4)
        assert (got - dec(same)).abs().max() > 1e-3  # the position did change the result
        past = runner.model.model.layers[0].self_attn.rotary.cos.shape[0]
        bad = DecodeBatch.build([7], [past], [n], tables, runner.block_size)
        with pytest.raises(RuntimeError, match="rotary table"):
            dec(bad)


def test_switch_and_unsupported_models(tiny, monkeypatch):
    monkeypatch.setenv("TURBOINFER_CPU_KERNELS", "0")
    assert load(tiny, "float32").engine.executor.worker.runner.cpu_decoder is None
    monkeypatch.delenv("TURBOINFER_CPU_KERNELS")
    llm = LLM(tiny, dtype="float32", quantization="int4", quant_group_size=32, kv_cache_dtype="fp8",
              max_model_len=256, kv_cache_memory="16MiB")
    assert llm.engine.executor.worker.runner.cpu_decoder is None  # an fp8 KV cache stays on the PyTorch path
    assert "KV" in cpu_decode.accepts(llm.engine.executor.worker.runner.model, torch.float8_e4m3fn, torch.float32)
    llm = LLM(tiny, dtype="float32", max_model_len=256, kv_cache_memory="16MiB")
    assert llm.engine.executor.worker.runner.cpu_decoder is None  # float weights


@pytest.mark.parametrize("arch", ["llama-hd64", "llama-mqa-hd128"])
def test_c_step_long_context_across_blocks(arch, tmp_path_factory):
    """Contexts of 200+ tokens in blocks of 8: every attention split spans many blocks, so the row walk crosses
    block edges mid-split and the look-ahead prefetch runs (it starts 32 tokens into a split)."""
    path = make_tiny_model(tmp_path_factory, arch)[0]
    llm = load(path, "float32", block_size=8)
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (200, 171)]
    sp = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)
    results = []
    for use_c in (False, True):
        llm.engine.executor.worker.runner.cpu_decoder = dec if use_c else None
        outs = llm.generate(prompts, sp, use_tqdm=False)
        results.append(([o.outputs[0].token_ids for o in outs],
                        torch.tensor([[s[t].logprob for s, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]
                                      for o in outs])))
    (ref_tokens, ref_lps), (tokens, lps) = results
    assert tokens == ref_tokens
    torch.testing.assert_close(lps, ref_lps, rtol=0, atol=2e-4)
