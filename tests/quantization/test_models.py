"""Tiny models quantized at load and through `turboinfer quantize`, against their float selves.

Metric: relative logit error ||L_q - L||_F / ||L||_F over every position of an English prompt the calibration
text does not contain (the tiny models' weights are large and random, so errors are much larger than on real
checkpoints; see docs/quantization.md for a real model)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tiny_models import full_logits
from turboinfer import LLM
from turboinfer.errors import InvalidRequestError, UnsupportedModelError
from turboinfer.layers.linear import Linear, UnquantizedMethod
from turboinfer.quantize_cli import quantize_checkpoint

HELD_OUT = ("Rivers carve their valleys slowly. After heavy rain the water turns brown with silt, and the fish "
            "shelter under roots near the bank until the flood passes and the current calms again in summer.")


def load(path: str, **kw) -> LLM:
    return LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="16MiB", num_threads=1, **kw)


def logits(path: str, **kw) -> torch.Tensor:
    llm = load(path, **kw)
    return full_logits(llm, llm.get_tokenizer().encode(HELD_OUT))


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x - ref).norm() / ref.norm()).item()


def test_int8_is_close_to_float_and_int4_further(tiny_model):
    path, _ = tiny_model
    ref = logits(path)
    int8 = logits(path, quantization="int8")
    int4 = logits(path, quantization="int4", quant_group_size=32)
    assert rel_err(int8, ref) < 0.06
    assert (int8.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.85  # greedy choices mostly unchanged
    assert rel_err(int8, ref) < rel_err(int4, ref) < 0.6


def test_linears_are_quantized_and_dense_weights_freed(tiny_model):
    path, _ = tiny_model
    llm = load(path, quantization="int4")  # group 128: the 64-wide layers fall back to 64
    model = llm.engine.executor.worker.runner.model
    quantized = [name for name, m in model.named_modules()
                 if isinstance(m, Linear) and not isinstance(m.quant_method, UnquantizedMethod)]
    assert len(quantized) == 4 * model.arch.num_layers == llm.engine.executor.worker.num_packed_layers  # qkv, o, gate_up, down
    for name in quantized:
        assert model.get_submodule(name).weight.numel() == 0
    assert model.model.embed_tokens.weight.numel() == model.arch.vocab_size * model.arch.hidden_size
    if model.lm_head is not None:
        assert isinstance(model.lm_head.quant_method, UnquantizedMethod)
    out = llm.generate("The quick brown fox", use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) > 0


@pytest.mark.parametrize("group_size", [32, 128])
def test_awq_beats_round_to_nearest_on_outlier_channels(outlier_model, group_size):
    ref = logits(outlier_model)
    rtn = logits(outlier_model, quantization="int4", quant_group_size=group_size)
    awq = logits(outlier_model, quantization="int4", quant_group_size=group_size, awq=True)
    assert rel_err(awq, ref) < 0.95 * rel_err(rtn, ref)


@pytest.mark.parametrize("method", ["int8", "int4", "awq"])
def test_quantize_then_reload_equals_quantize_at_load(tiny_model, method, tmp_path, monkeypatch):
    path, _ = tiny_model
    quantization, awq = {"int8": ("int8", False), "int4": ("int4", False), "awq": ("int4", True)}[method]
    at_load = logits(path, quantization=quantization, quant_group_size=64, awq=awq)
    out = tmp_path / "q"
    quantize_checkpoint(path, str(out), method, group_size=64, dtype="float32")

    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "turboinfer", "bits": 8 if method == "int8" else 4,
                    "group_size": -1 if method == "int8" else 64, "awq": awq}
    assert (out / "tokenizer.json").exists()
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    # stored per checkpoint shard, under the checkpoint's names
    for part in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "o_proj", "down_proj"):
        assert any(f"{part}.qweight" in k for k in keys), part
    assert not any("qkv_proj" in k or "gate_up_proj" in k for k in keys)
    assert ("model.layers.0.self_attn.q_proj.input_scale" in keys) == awq

    def no_requantizing(*args, **kwargs):
        raise AssertionError("a quantized checkpoint was quantized again")

    monkeypatch.setattr("turboinfer.layers.quantization.transform.quantize_model", no_requantizing)
    reloaded = logits(str(out))
    assert torch.equal(reloaded, at_load)
    assert torch.equal(logits(str(out), quantization=quantization, quant_group_size=64, awq=awq), at_load)


def test_quantization_of_a_gguf_is_refused(tmp_path):
    from gguf_writer import write_gguf_file

    path = write_gguf_file(tmp_path / "m.gguf", "llama", {"token_embd.weight": torch.zeros(8, 4).numpy()})
    with pytest.raises(InvalidRequestError, match="GGUF.*already quantized"):
        load(path, quantization="int4")


def test_conflicting_or_foreign_quantized_checkpoints_are_refused(qwen2_model, tmp_path):
    path, _ = qwen2_model
    out = tmp_path / "q"
    quantize_checkpoint(path, str(out), "int8", dtype="float32")
    with pytest.raises(InvalidRequestError, match="already quantized"):
        load(str(out), quantization="int4")
    with pytest.raises(InvalidRequestError, match="already quantized"):
        quantize_checkpoint(str(out), str(tmp_path / "again"), "int4")
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="gptq"):
        load(str(out))


@pytest.mark.parametrize("kwargs, message", [
    (dict(quantization="int3"), "--quantization"),
    (dict(quantization="int4", quant_group_size=48), "--quant-group-size"),
    (dict(quantization="int8", awq=True), "--awq needs"),
])
def test_bad_options_are_named(kwargs, message):
    from turboinfer.config import EngineConfig

    with pytest.raises(InvalidRequestError, match=message):
        EngineConfig(**kwargs)
