"""GGUFFile: config mapping, name mapping, the llama q/k un-permutation, and clear errors on bad files."""

import gguf
import numpy as np
import pytest
import torch

from turboinfer.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from turboinfer.loader.gguf_dequant import dequantize
from turboinfer.loader.gguf_file import GGUFFile
from turboinfer.models.llama_family import LLAMA
from turboinfer.models.registry import arch_from_hf_config

LAYER_PARAMS = ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]


@pytest.fixture(scope="module")
def smollm(default_model_path):
    return GGUFFile(default_model_path)


def test_hf_config_of_default_model(smollm):
    cfg = smollm.hf_config()
    assert cfg == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 49152, "hidden_size": 576,
        "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "rope_scaling": None,
        "max_position_embeddings": 8192, "tie_word_embeddings": True, "attention_bias": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float16", "mlp_bias": False,
    }
    arch = arch_from_hf_config(cfg)
    assert (arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.eos_token_ids) == (9, 3, 64, (2,))
    assert smollm.architecture == "llama"
    assert smollm.metadata["tokenizer.ggml.pre"] == "smollm"
    assert set(smollm.tokenizer_metadata()) >= {"tokenizer.ggml.tokens", "tokenizer.chat_template"}


def test_every_tensor_maps_to_an_hf_name(smollm):
    names = smollm.tensor_names()
    assert len(names) == 272 == len(set(names))
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    expected |= {f"model.layers.{i}.{p}.weight" for i in range(30) for p in LAYER_PARAMS}
    assert set(names) == expected
    assert LLAMA.hf_tensor_name("blk.7.attn_output.weight") == "model.layers.7.self_attn.o_proj.weight"
    assert LLAMA.hf_tensor_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert LLAMA.hf_tensor_name("blk.0.attn_k_norm.weight") == "model.layers.0.self_attn.k_norm.weight"
    assert LLAMA.hf_tensor_name("blk.0.attn_qkv.weight") is None


def test_tensors_in_hf_layout(smollm):
    shapes = {n: tuple(smollm.get_tensor(n).shape) for n in
              ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
               "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight",
               "model.layers.0.mlp.gate_proj.weight", "model.norm.weight"]}
    assert list(shapes.values()) == [(49152, 576), (576, 576), (192, 576), (576, 1536), (1536, 576), (576,)]
    assert smollm.get_tensor("model.norm.weight", torch.bfloat16).dtype == torch.bfloat16


def test_raw_tensor_matches_dequantized(smollm):
    for name in ["model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                 "model.layers.3.mlp.up_proj.weight", "model.embed_tokens.weight"]:
        qtype, raw, shape = smollm.raw_tensor(name)
        assert raw.dtype == np.uint8 and raw.shape[0] == shape[0]
        assert torch.equal(dequantize(raw, qtype, shape), smollm.get_tensor(name)), name


def test_qk_unpermute_matches_transformers_gguf_loader(smollm):
    """transformers' GGUF loader reverses llama.cpp's q/k row permutation with its own code (the llama tensor
    processor that `load_gguf_checkpoint` applies to every tensor); ours must agree bit for bit on every layer.
    (`from_pretrained(gguf_file=)` itself needs accelerate, and dequantizing the whole model twice is slow.)"""
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, load_gguf_checkpoint

    processor = TENSOR_PROCESSORS["llama"](config=load_gguf_checkpoint(smollm.path)["config"])
    reader = gguf.GGUFReader(smollm.path)
    checked = 0
    for t in reader.tensors:
        if ".attn_q." in t.name or ".attn_k." in t.name:
            theirs = processor.process(weights=gguf.quants.dequantize(t.data, t.tensor_type), name=t.name).weights
            ours = smollm.get_tensor(LLAMA.hf_tensor_name(t.name))
            assert torch.equal(ours, torch.from_numpy(np.ascontiguousarray(theirs))), t.name
            checked += 1
    assert checked == 60


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # the converter's LlamaModel.permute: HF rotate-half row order -> ggml interleaved pairs
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_kv(arch="llama", heads=4, kv_heads=2, hidden=64, **extra):
    kv = {f"{arch}.embedding_length": hidden, f"{arch}.block_count": 1, f"{arch}.attention.head_count": heads,
          f"{arch}.attention.head_count_kv": kv_heads, f"{arch}.feed_forward_length": 96,
          f"{arch}.context_length": 512, f"{arch}.rope.freq_base": 10000.0,
          f"{arch}.attention.layer_norm_rms_epsilon": 1e-6}
    kv.update({k.format(arch=arch): v for k, v in extra.items()})
    return kv


def _tiny_tensors(rng, hidden=64, heads=4, kv_heads=2, bias=False, qk_norm=False):
    hd = hidden // heads
    t = {"token_embd.weight": rng.standard_normal((32, hidden)), "output_norm.weight": rng.standard_normal(hidden),
         "blk.0.attn_norm.weight": rng.standard_normal(hidden), "blk.0.ffn_norm.weight": rng.standard_normal(hidden),
         "blk.0.attn_q.weight": rng.standard_normal((heads * hd, hidden)),
         "blk.0.attn_k.weight": rng.standard_normal((kv_heads * hd, hidden)),
         "blk.0.attn_v.weight": rng.standard_normal((kv_heads * hd, hidden)),
         "blk.0.attn_output.weight": rng.standard_normal((hidden, heads * hd)),
         "blk.0.ffn_gate.weight": rng.standard_normal((96, hidden)),
         "blk.0.ffn_up.weight": rng.standard_normal((96, hidden)),
         "blk.0.ffn_down.weight": rng.standard_normal((hidden, 96))}
    if bias:
        t.update({"blk.0.attn_q.bias": rng.standard_normal(heads * hd),
                  "blk.0.attn_k.bias": rng.standard_normal(kv_heads * hd),
                  "blk.0.attn_v.bias": rng.standard_normal(kv_heads * hd)})
    if qk_norm:
        t.update({"blk.0.attn_q_norm.weight": rng.standard_normal(hd),
                  "blk.0.attn_k_norm.weight": rng.standard_normal(hd)})
    return {k: v.astype(np.float32) for k, v in t.items()}


def test_llama_qk_permutation_is_undone(tmp_path, write_gguf):
    rng = np.random.default_rng(0)
    hf = _tiny_tensors(rng, bias=True)
    stored = dict(hf)
    for name, heads in (("attn_q", 4), ("attn_k", 2)):
        for kind in ("weight", "bias"):
            stored[f"blk.0.{name}.{kind}"] = _llama_cpp_permute(hf[f"blk.0.{name}.{kind}"], heads)
    # q also stored as Q8_0 blocks, to check raw_tensor's row un-permutation on packed bytes
    q8 = gguf.quants.quantize(stored["blk.0.attn_q.weight"], gguf.GGMLQuantizationType.Q8_0)
    stored["blk.0.attn_q.weight"] = (q8, gguf.GGMLQuantizationType.Q8_0)
    f = GGUFFile(write_gguf(tmp_path / "tiny.gguf", "llama", stored, _llama_kv()))
    got = dict(f.iter_tensors())
    assert set(got) == {LLAMA.hf_tensor_name(n) for n in hf}
    for gname, arr in hf.items():
        hname = LLAMA.hf_tensor_name(gname)
        if gname == "blk.0.attn_q.weight":
            expect = torch.from_numpy(gguf.quants.dequantize(
                gguf.quants.quantize(arr, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0))
        else:
            expect = torch.from_numpy(arr)
        assert torch.equal(got[hname], expect), gname
    qtype, raw, shape = f.raw_tensor("model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(dequantize(raw, qtype, shape), got["model.layers.0.self_attn.q_proj.weight"])
    cfg = f.hf_config()
    assert cfg["attention_bias"] and cfg["tie_word_embeddings"] and cfg["head_dim"] == 16


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_tensors_are_not_permuted(tmp_path, write_gguf, arch):
    rng = np.random.default_rng(1)
    hf = _tiny_tensors(rng, bias=arch == "qwen2", qk_norm=arch == "qwen3")
    hf["output.weight"] = rng.standard_normal((32, 64)).astype(np.float32)
    f = GGUFFile(write_gguf(tmp_path / f"{arch}.gguf", arch, hf, _llama_kv(arch)))
    got = dict(f.iter_tensors())
    assert {LLAMA.hf_tensor_name(n) for n in hf} == set(got)
    for gname, arr in hf.items():
        assert torch.equal(got[LLAMA.hf_tensor_name(gname)], torch.from_numpy(arr)), gname
    cfg = f.hf_config()
    assert cfg["architectures"] == [f"{arch.capitalize()}ForCausalLM"] and not cfg["tie_word_embeddings"]
    assert cfg["attention_bias"] == (arch == "qwen2")
    assert arch_from_hf_config(cfg).qk_norm == (arch == "qwen3")


def test_mistral_marked_by_name(tmp_path, write_gguf):
    t = _tiny_tensors(np.random.default_rng(5))
    f = GGUFFile(write_gguf(tmp_path / "m.gguf", "llama", t, {**_llama_kv(), "general.name": "Mistral 7B Instruct"}))
    cfg = f.hf_config()
    assert cfg["architectures"] == ["MistralForCausalLM"] and cfg["model_type"] == "mistral"
    assert arch_from_hf_config(cfg).sliding_window is None


def test_rope_scaling_keys(tmp_path, write_gguf):
    rng = np.random.default_rng(2)
    t = _tiny_tensors(rng)
    f = GGUFFile(write_gguf(tmp_path / "lin.gguf", "llama", t, _llama_kv(**{
        "{arch}.rope.scaling.type": "linear", "{arch}.rope.scaling.factor": 4.0})))
    assert f.hf_config()["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    f = GGUFFile(write_gguf(tmp_path / "yarn.gguf", "qwen2", t, _llama_kv("qwen2", **{
        "{arch}.rope.scaling.type": "yarn", "{arch}.rope.scaling.factor": 4.0,
        "{arch}.rope.scaling.original_context_length": 32768})))
    assert f.hf_config()["rope_scaling"] == {"rope_type": "yarn", "factor": 4.0,
                                             "original_max_position_embeddings": 32768}


def test_llama3_rope_freqs_become_rope_scaling(tmp_path, write_gguf):
    # the converter's Llama-3.1 factors for head_dim 16, theta 500000, factor 8, band 1..4, old context 8192
    import math

    theta, dim, factor = 500000.0, 16, 8.0
    factors = []
    for freq in 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim):
        wavelen = 2 * math.pi / freq
        if wavelen < 8192 / 4:
            factors.append(1.0)
        elif wavelen > 8192 / 1:
            factors.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    t = _tiny_tensors(np.random.default_rng(3))
    t["rope_freqs.weight"] = np.array(factors, dtype=np.float32)
    f = GGUFFile(write_gguf(tmp_path / "l3.gguf", "llama", t, _llama_kv(**{"{arch}.rope.freq_base": theta})))
    assert f.hf_config()["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert "rope_freqs.weight" not in dict(f.iter_tensors())


def test_unsupported_architecture_and_tensor(tmp_path, write_gguf):
    t = _tiny_tensors(np.random.default_rng(4))
    f = GGUFFile(write_gguf(tmp_path / "g.gguf", "gpt2", t, _llama_kv("gpt2")))
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        f.hf_config()
    with pytest.raises(UnsupportedModelError, match="'gpt2'"):
        next(f.iter_tensors())
    t["blk.0.attn_qkv.weight"] = np.zeros((8, 64), np.float32)
    f = GGUFFile(write_gguf(tmp_path / "qkv.gguf", "llama", t, _llama_kv()))
    with pytest.raises(UnsupportedModelError, match="attn_qkv"):
        next(f.iter_tensors())


def test_missing_file():
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        GGUFFile("/nonexistent/model.gguf")


@pytest.mark.parametrize("damage", ["half", "header_only", "magic", "text", "empty"])
def test_bad_files_raise_model_load_error(tmp_path, default_model_path, damage):
    with open(default_model_path, "rb") as f:
        head = f.read(4_000_000)
        size = f.seek(0, 2)
    path = tmp_path / f"{damage}.gguf"
    if damage == "half":
        with open(default_model_path, "rb") as src:
            path.write_bytes(src.read(size // 2))
    elif damage == "header_only":
        path.write_bytes(head)
    elif damage == "magic":
        path.write_bytes(b"XGUF" + head[4:])
    elif damage == "text":
        path.write_text("this is not a model\n")
    else:
        path.write_bytes(b"")
    with pytest.raises(ModelLoadError) as e:
        GGUFFile(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
