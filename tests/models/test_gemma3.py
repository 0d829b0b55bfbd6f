"""Gemma 3 from GGUF files: a tiny random-weight model written as llama.cpp's converter writes Gemma 3 (norm
weights stored as 1 + w, its own tensor names, Q5_0 / Q8_0 blocks) against HF transformers with the same weights;
and the real gemma3-270m file when it is in the cache (it is not the default model, so tests never download it).

Tolerance as in test_parity.py: logits agree to rtol 1e-4 with an absolute floor of 1e-4 x max|logit|."""

from __future__ import annotations

import os

import gguf
import pytest
import torch

from gguf_writer import write_gguf_file
from turboinfer.layers.quantization.awq import calibration_batch
from turboinfer.loader.gguf_file import GGUFFile
from turboinfer.loader.model_loader import load_arch, load_weights_into
from turboinfer.loader.resolve import ALIASES, cache_dir, resolve_model
from turboinfer.models.registry import arch_from_hf_config, build_model

Q = gguf.GGMLQuantizationType
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, LAYERS, WINDOW = 64, 4, 2, 16, 128, 512, 2, 8
# HF name fragment -> llama.cpp gemma3 tensor name, and the type each is stored in
PER_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
             "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TYPES = {"attn_q": Q.Q5_0, "attn_k": Q.Q5_0, "attn_v": Q.Q8_0, "attn_output": Q.Q5_1, "ffn_gate": Q.Q5_0,
         "ffn_up": Q.Q5_0, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0}


def _hf_model():
    import transformers

    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"], max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.empty_like(p).normal_(0, 0.15) if p.dim() >= 2 else torch.empty_like(p).uniform_(-0.2, 0.2))
    return model


@pytest.fixture(scope="module")
def gemma_gguf(tmp_path_factory):
    """(path of a GGUF written the converter's way, HF model holding exactly the file's dequantized weights)."""
    hf = _hf_model()
    tensors, sd = {}, hf.state_dict()
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue  # tied
        if name == "model.embed_tokens.weight":
            gname = "token_embd"
        elif name == "model.norm.weight":
            gname = "output_norm"
        else:
            layer = name.split(".")[2]
            frag = name.split(f"layers.{layer}.")[1].rsplit(".", 1)[0]
            gname = f"blk.{layer}.{PER_LAYER[frag]}"
        arr = t.float().numpy()
        if gname.endswith("norm"):
            arr = arr + 1  # llama.cpp's converter: Gemma norms multiply by 1 + w
        qtype = TYPES.get(gname.split(".")[-1])
        if qtype is None:
            tensors[f"{gname}.weight"] = arr
        else:
            raw = gguf.quants.quantize(arr, qtype)
            tensors[f"{gname}.weight"] = (raw, qtype)
            with torch.no_grad():  # the reference holds what the file holds
                sd[name].copy_(torch.from_numpy(gguf.quants.dequantize(raw, qtype)))
    kv = {"gemma3.embedding_length": HIDDEN, "gemma3.block_count": LAYERS, "gemma3.attention.head_count": HEADS,
          "gemma3.attention.head_count_kv": KV_HEADS, "gemma3.feed_forward_length": INTER,
          "gemma3.context_length": 256, "gemma3.rope.freq_base": 1000000.0,
          "gemma3.attention.layer_norm_rms_epsilon": 1e-6, "gemma3.attention.key_length": HEAD_DIM,
          "gemma3.attention.value_length": HEAD_DIM, "gemma3.attention.sliding_window": WINDOW,
          "gemma3.attention.sliding_window_pattern": [True, False]}
    path = write_gguf_file(tmp_path_factory.mktemp("gemma3") / "tiny-gemma3.gguf", "gemma3", tensors, kv)
    return path, hf


def _logits(path: str, ids: list[int], keep_packed: bool) -> torch.Tensor:
    resolved = resolve_model(path)
    model = build_model(load_arch(resolved), torch.device("cpu"), torch.float32)
    load_weights_into(model, resolved, torch.device("cpu"), keep_packed=keep_packed)
    with calibration_batch(model, len(ids)) as (positions, meta), torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, meta)).float()


def test_config_from_gguf(gemma_gguf):
    arch = arch_from_hf_config(GGUFFile(gemma_gguf[0]).hf_config())
    assert arch.architecture == "Gemma3ForCausalLM" and arch.hidden_act == "gelu_pytorch_tanh" and arch.qk_norm
    assert [arch.layer_window(i) for i in range(LAYERS)] == [WINDOW, None]
    assert (arch.rope_theta, arch.rope_local_theta, arch.query_pre_attn_scalar) == (1e6, 1e4, HEAD_DIM)
    assert arch.tie_word_embeddings and arch.final_logit_softcapping is None


def test_norms_read_back_to_checkpoint_values(gemma_gguf):
    path, hf = gemma_gguf
    f = GGUFFile(path)
    for name in ("model.norm.weight", "model.layers.1.post_feedforward_layernorm.weight",
                 "model.layers.0.self_attn.k_norm.weight"):
        torch.testing.assert_close(f.get_tensor(name), hf.state_dict()[name], rtol=0, atol=1e-7)


@pytest.mark.parametrize("keep_packed", [False, True], ids=["dequantized", "packed"])
def test_logits_match_transformers(gemma_gguf, keep_packed):
    """40 tokens: past the window of 8 on the sliding layer. Packed: Q5_0 / Q5_1 / Q8_0 linears on the int8 path,
    the Q8_0 table as embedding and tied output projection (bf16 activations inside those matmuls, so the
    comparison there is to the dequantized path's logits at bf16's precision)."""
    path, hf = gemma_gguf
    ids = torch.randint(3, VOCAB, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = _logits(path, ids, keep_packed)
    if not keep_packed:
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    else:
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, rel
        assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.95


REAL = cache_dir() / "gemma3-270m" / ALIASES["gemma3-270m"].member


@pytest.mark.skipif(not REAL.is_file(), reason="gemma3-270m is not in the cache (turboinfer pull is not run by tests)")
def test_real_gemma3_270m_against_transformers():
    """The real file: its dequantized weights in HF's Gemma3ForCausalLM (config from the file) give the same
    logits as the engine's float32 path over 600 tokens (past the 512-token window), and greedy text is sane."""
    import transformers

    from turboinfer import LLM, SamplingParams

    f = GGUFFile(str(REAL))
    cfg = f.hf_config()
    hf_cfg = transformers.Gemma3TextConfig(**{k: v for k, v in cfg.items() if k not in (
        "architectures", "model_type", "hidden_act", "rope_theta", "rope_scaling", "rope_local_base_freq",
        "torch_dtype")}, rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg["rope_theta"]},
                                          "sliding_attention": {"rope_type": "default",
                                                                "rope_theta": cfg["rope_local_base_freq"]}})
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.float32).eval()
    missing, unexpected = hf.load_state_dict(dict(f.iter_tensors()), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    hf.tie_weights()
    llm = LLM(str(REAL), dtype="float32", dequantize_gguf=True, max_model_len=1024, kv_cache_memory="256MiB")
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data", "lighthouses.txt")).read()
    ids = llm.engine.tokenizer.encode(text)[:600]
    from tiny_models import full_logits

    ours = full_logits(llm, ids)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    out = llm.generate(["The capital of France is"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text or "capital" in out[0].outputs[0].text
