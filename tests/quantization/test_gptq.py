"""GPTQ (layers/quantization/gptq.py): lower layer output error than round-to-nearest on the activations it was
calibrated on, valid Q4Weights, `turboinfer quantize --method gptq` reloading to identical logits, and its flags."""

from __future__ import annotations

import json

import pytest
import torch

from tiny_models import full_logits
from turboinfer import LLM
from turboinfer.cli import main
from turboinfer.errors import InvalidRequestError
from turboinfer.layers.quantization.awq import calibration_text, collect_input_stats
from turboinfer.layers.quantization.checkpoint import from_tensors, to_tensors
from turboinfer.layers.quantization.gptq import quantize_gptq, quantize_model_gptq
from turboinfer.layers.quantization.q4 import quantize_q4
from turboinfer.layers.quantization.transform import quantizable_linears
from turboinfer.loader.model_loader import load_arch, load_tokenizer, load_weights_into
from turboinfer.loader.resolve import resolve_model
from turboinfer.models.registry import build_model

PROMPT = "Rivers carve their valleys slowly, and the fish shelter under roots near the bank until the flood passes."


def float_model(path: str):
    resolved = resolve_model(path)
    model = build_model(load_arch(resolved), torch.device("cpu"), torch.float32)
    load_weights_into(model, resolved, torch.device("cpu"))
    ids = load_tokenizer(resolved).encode(calibration_text())[:model.arch.max_position_embeddings]
    return model, ids


@pytest.mark.parametrize("group_size", [32, 64])
def test_gptq_output_error_is_below_round_to_nearest_on_calibration_inputs(qwen2_model, group_size):
    model, ids = float_model(qwen2_model[0])
    stats = collect_input_stats(model, ids, max_sample_rows=len(ids))  # every calibration row
    linears = quantizable_linears(model)
    assert len(linears) == 4 * model.arch.num_layers
    for name, linear in linears:
        w, x = linear.weight.data, stats[name].sample  # x: [num_tokens, K]
        ref = x @ w.t()
        gptq = quantize_gptq(w, 2 * x.t() @ x / x.shape[0], group_size)
        rtn = quantize_q4(w, group_size)
        err_gptq = (x @ gptq.dequantize().t() - ref).norm()
        err_rtn = (x @ rtn.dequantize().t() - ref).norm()
        assert err_gptq < 0.9 * err_rtn, name


def test_gptq_model_weights_are_valid_q4_and_round_trip(qwen2_model):
    model, ids = float_model(qwen2_model[0])
    dense = {name: m.weight.data.clone() for name, m in quantizable_linears(model)}
    quantized = quantize_model_gptq(model, ids, 32, torch.device("cpu"))
    assert quantized.keys() == dense.keys()
    for name, qw in quantized.items():
        assert qw.q.dtype == torch.uint8 and 0 <= qw.q.min() and qw.q.max() <= 15
        assert qw.shape == dense[name].shape and qw.group_size == 32 and qw.input_scale is None
        assert model.get_submodule(name).weight.numel() == 0  # dense copy freed
        back = from_tensors({k.rsplit(".", 1)[1]: v for k, v in to_tensors("x", qw).items()}, bits=4)
        assert torch.equal(back.q, qw.q) and torch.equal(back.scale, qw.scale) and torch.equal(back.zero, qw.zero)
        assert torch.equal(back.dequantize(), qw.dequantize())
        # error feedback moves weights across a rounding boundary at most a few steps, never out of the group
        step = qw.scale.repeat_interleave(32, dim=1)
        assert ((qw.dequantize() - dense[name]).abs() <= 4 * step + 1e-6).float().mean() > 0.99


def logits(path: str, **kw) -> torch.Tensor:
    llm = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory="16MiB", num_threads=1, **kw)
    return full_logits(llm, llm.get_tokenizer().encode(PROMPT))


def test_quantize_gptq_checkpoint_reloads_with_identical_logits(qwen2_model, tmp_path, capsys):
    path, _ = qwen2_model
    out = tmp_path / "gptq"
    assert main(["quantize", path, str(out), "--method", "gptq", "--group-size", "32", "--dtype", "float32"]) == 0
    assert "linear layers quantized (gptq)" in capsys.readouterr().err
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg == {"quant_method": "turboinfer", "bits": 4, "group_size": 32, "awq": False, "gptq": True}

    at_load = logits(path, quantization="int4", quant_group_size=32, gptq=True)
    assert torch.equal(logits(str(out)), at_load)
    assert torch.equal(logits(str(out), quantization="int4", quant_group_size=32, gptq=True), at_load)
    assert not torch.equal(logits(path, quantization="int4", quant_group_size=32), at_load)  # not plain RTN
    with pytest.raises(InvalidRequestError, match="already quantized"):
        logits(str(out), quantization="int4", quant_group_size=32)  # stored GPTQ, asked for RTN


@pytest.mark.parametrize("kwargs, message", [
    (dict(gptq=True), "--gptq needs --quantization int4"),
    (dict(quantization="int8", gptq=True), "--gptq needs --quantization int4"),
    (dict(quantization="int4", gptq=True, awq=True), "--gptq and --awq"),
])
def test_bad_gptq_options_are_named(kwargs, message):
    from turboinfer.config import EngineConfig

    with pytest.raises(InvalidRequestError, match=message):
        EngineConfig(**kwargs)
    EngineConfig(quantization="int4", gptq=True)  # the valid spelling


def test_gptq_flag_on_the_command_line(qwen2_model, capsys):
    assert main(["generate", "The quick brown fox", "--model", qwen2_model[0], "--quantization", "int8", "--gptq",
                 "--max-tokens", "2"]) == 2
    assert "--gptq needs --quantization int4" in capsys.readouterr().err
