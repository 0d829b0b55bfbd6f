"""GGUF files whose linear layers mix Q8_0, Q5_K and Q6_K with 4-bit types (as llama.cpp's Q4_K_M / Q5_K_M / Q8_0
files do) load without dequantizing and compute like the dequantized model.

The file is the default model rewritten: layer 0's ffn_down in Q6_K, every linear of layer 1 in Q8_0, layer 2's
ffn_down in Q5_K, layer 3's attn_v in Q8_0 beside Q4_1 q and k (one merged q|k|v layer in two formats); the rest stays
Q4_1. (K-quants need rows that are a multiple of 256: here only ffn_down's 1536.) The bar is the default model's:
mean log-likelihood within 0.005 nats of the exact float32 dequantized model and the same top token at >95% of
positions, for prefill and for the C decode step."""

from __future__ import annotations

import os

import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf_writer import rewrite_gguf
from tiny_models import full_logits

from turboinfer import LLM, SamplingParams
from turboinfer.layers.quantization import PartsMethod
from turboinfer.layers.quantization.grouped_int8 import GroupedInt8CPUMethod
from turboinfer.layers.quantization.q4 import Int4CPUMethod
from turboinfer.bench.probe import teacher_forced_logits

REENCODE = {"blk.0.ffn_down.weight": T.Q6_K, "blk.2.ffn_down.weight": T.Q5_K, "blk.3.attn_v.weight": T.Q8_0}
REENCODE.update({f"blk.1.{p}.weight": T.Q8_0 for p in
                 ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")})


@pytest.fixture(scope="module")
def mixed_path(tmp_path_factory, default_model_path):
    return rewrite_gguf(default_model_path, str(tmp_path_factory.mktemp("mixed") / "smollm2-mixed.gguf"), REENCODE)


@pytest.fixture(scope="module")
def packed(mixed_path):
    return LLM(mixed_path, dtype="float32", max_model_len=512, kv_cache_memory="32MiB")


@pytest.fixture(scope="module")
def exact(mixed_path):
    return LLM(mixed_path, dtype="float32", dequantize_gguf=True, max_model_len=512, kv_cache_memory="32MiB")


def _ids(llm) -> list[int]:
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data", "lighthouses.txt")).read()
    return llm.get_tokenizer().encode(text)[:300]


def _close(a: torch.Tensor, b: torch.Tensor, ids: list[int]) -> None:
    target = torch.tensor(ids[1:])[:, None]
    lp_a = a.log_softmax(-1)[:-1].gather(-1, target)
    lp_b = b.log_softmax(-1)[:-1].gather(-1, target)
    assert abs((lp_a - lp_b).mean()) < 0.005
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95


def test_every_linear_stays_quantized(packed):
    assert packed.engine.executor.worker.num_packed_layers == 30 * 4
    layers = packed.engine.executor.worker.runner.model.model.layers
    kinds = {(i, name): type(getattr(getattr(layers[i], part), name).quant_method)
             for i in range(5) for part, name in (("self_attn", "qkv_proj"), ("self_attn", "o_proj"),
                                                  ("mlp", "gate_up_proj"), ("mlp", "down_proj"))}
    int8 = {k for k, v in kinds.items() if v is GroupedInt8CPUMethod}
    assert int8 == {(0, "down_proj"), (1, "qkv_proj"), (1, "o_proj"), (1, "gate_up_proj"), (1, "down_proj"),
                    (2, "down_proj")}
    assert kinds.pop((3, "qkv_proj")) is PartsMethod  # q|k in Q4_1, v in Q8_0: two parts
    qkv3 = layers[3].self_attn.qkv_proj.quant_method
    assert [type(m) for m in qkv3.methods] == [Int4CPUMethod, GroupedInt8CPUMethod] and qkv3.rows == [576 + 192, 192]
    assert all(v is Int4CPUMethod for k, v in kinds.items() if k not in int8)
    assert layers[0].mlp.down_proj.quant_method.group_size == 16  # Q6_K
    assert layers[2].mlp.down_proj.quant_method.w.zero is not None  # Q5_K's mins
    assert packed.engine.executor.worker.runner.cpu_decoder is not None  # the C step takes the mix


def test_prefill_tracks_dequantized_model(packed, exact):
    ids = _ids(packed)
    _close(full_logits(packed, ids), full_logits(exact, ids), ids)


def test_c_decode_step_tracks_dequantized_model(packed, exact):
    ids = _ids(packed)
    _close(teacher_forced_logits(packed, ids), full_logits(exact, ids), ids)


def test_generates_the_same_answer(packed, exact):
    sp = SamplingParams(temperature=0, max_tokens=8)
    a = packed.generate("The capital of France is", sp, use_tqdm=False)[0].outputs[0].text
    b = exact.generate("The capital of France is", sp, use_tqdm=False)[0].outputs[0].text
    assert a == b and "Paris" in a


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_the_mix_quantized(request):
    """On CUDA the same file runs through the Triton dequant-matmuls (int4 and int8 codes), not dequantized. (A GPU
    machine without a network has no default model to rewrite unless its cache was copied there: then it skips.)"""
    from turboinfer.errors import TurboInferError
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8TritonMethod
    from turboinfer.layers.quantization.q4 import Int4TritonMethod

    try:
        mixed_path, exact = request.getfixturevalue("mixed_path"), request.getfixturevalue("exact")
    except (TurboInferError, OSError) as e:
        pytest.skip(f"the default model is not available here: {e}")

    gpu = LLM(mixed_path, device="cuda", dtype="float32", max_model_len=512, kv_cache_memory="256MiB")
    layers = gpu.engine.executor.worker.runner.model.model.layers
    assert isinstance(layers[1].self_attn.qkv_proj.quant_method, GroupedInt8TritonMethod)
    assert isinstance(layers[5].mlp.gate_up_proj.quant_method, Int4TritonMethod)
    ids = _ids(gpu)
    _close(full_logits(gpu, ids).cpu(), full_logits(exact, ids), ids)
    sp = SamplingParams(temperature=0, max_tokens=8)
    assert "Paris" in gpu.generate("The capital of France is", sp, use_tqdm=False)[0].outputs[0].text


def test_int8_token_table_lookups_and_tied_logits(default_model_path, monkeypatch, exact):
    """The int8 path Q6_K / Q5_K token tables take (llama.cpp's Q4_K_M files store them so), run with the default
    model's Q8_0 table: lookups equal the dequantized rows exactly, and the tied output projection (the C int8
    kernel, inside the decode step and outside it) tracks the float32 dequantized model."""
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8CPUMethod
    from turboinfer.loader import model_loader
    from turboinfer.runner import cpu_decode

    monkeypatch.setattr(model_loader, "Q8_0_TABLE", False)
    llm = LLM(default_model_path, dtype="float32", max_model_len=512, kv_cache_memory="32MiB")
    emb = llm.engine.executor.worker.runner.model.model.embed_tokens
    assert not emb.is_quantized and isinstance(emb.grouped_method, GroupedInt8CPUMethod)
    ref_emb = exact.engine.executor.worker.runner.model.model.embed_tokens
    ids = torch.tensor([0, 1, 7, 4242, 49151])
    assert torch.equal(emb(ids), ref_emb(ids).float())
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert dec is not None and int(dec.dims[cpu_decode.DIMS.index("logits")]) == cpu_decode.LOGITS_INT8
    text = _ids(llm)
    _close(full_logits(llm, text), full_logits(exact, text), text)
    _close(teacher_forced_logits(llm, text), full_logits(exact, text), text)


def test_untied_int8_output_projection_runs_inside_the_step(tmp_path_factory, default_model_path, exact):
    """An untied output.weight in Q8_0 (a copy of the table): lm_head stays int8 codes and the decode step computes
    the logits with it; they track the tied float32 model (the same numbers, rounded once more to Q8_0)."""
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8CPUMethod
    from turboinfer.runner import cpu_decode

    path = rewrite_gguf(default_model_path, str(tmp_path_factory.mktemp("untied") / "m.gguf"), {},
                        add={"output.weight": ("token_embd.weight", T.Q8_0)})
    llm = LLM(path, dtype="float32", max_model_len=512, kv_cache_memory="32MiB")
    model = llm.engine.executor.worker.runner.model
    assert model.lm_head is not None and isinstance(model.lm_head.quant_method, GroupedInt8CPUMethod)
    dec = llm.engine.executor.worker.runner.cpu_decoder
    assert int(dec.dims[cpu_decode.DIMS.index("logits")]) == cpu_decode.LOGITS_INT8
    text = _ids(llm)
    _close(teacher_forced_logits(llm, text), full_logits(exact, text), text)
