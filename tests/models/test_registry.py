"""The family registry: every way of naming a family finds the same descriptor, unknown names are refused with the
supported list, the registry imports no torch, and each descriptor's shape facts match the model class it builds
(the memory estimator counts what the engine allocates)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from turboinfer.errors import UnsupportedModelError
from turboinfer.layers.quantization.awq import calibration_batch
from turboinfer.loader.model_loader import load_arch, load_weights_into
from turboinfer.loader.resolve import resolve_model
from turboinfer.memory import model_shape, num_params
from turboinfer.models import registry
from turboinfer.models.gemma3_family import GEMMA3
from turboinfer.models.llama_family import LLAMA

NAMES = {  # family -> (HF architectures, model types, GGUF architectures)
    LLAMA: (["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"],
            ["llama", "mistral", "qwen2", "qwen3"], ["llama", "mistral", "qwen2", "qwen3"]),
    GEMMA3: (["Gemma3ForCausalLM"], ["gemma3_text"], ["gemma3"]),
}
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("family", list(NAMES), ids=lambda f: f.name)
def test_every_name_finds_the_same_family(family):
    hf_names, model_types, gguf_names = NAMES[family]
    assert registry.FAMILIES.count(family) == 1
    assert [registry.by_hf_architecture(n) for n in hf_names] == [family] * len(hf_names)
    assert [registry.by_model_type(t) for t in model_types] == [family] * len(model_types)
    assert [registry.by_gguf_architecture(g) for g in gguf_names] == [family] * len(gguf_names)
    for name, model_type in zip(hf_names, model_types):
        cfg = {**TINY, "model_type": model_type, "head_dim": 16}
        by_name = registry.arch_from_hf_config({**cfg, "architectures": [name]})
        by_type = registry.arch_from_hf_config(cfg)  # no architectures listed: the model_type decides
        assert by_name == by_type and by_name.architecture == name
        assert registry.family_of(by_name) is family


def test_unknown_architectures_are_refused_with_the_supported_ones():
    listed = "supported: Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM"
    with pytest.raises(UnsupportedModelError, match=f"architecture 'GPT2LMHeadModel' is not supported; {listed}"):
        registry.arch_from_hf_config({**TINY, "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"})
    with pytest.raises(UnsupportedModelError, match=f"architecture 'bert' is not supported; {listed}"):
        registry.arch_from_hf_config({**TINY, "model_type": "bert"})
    assert registry.by_hf_architecture("GPT2LMHeadModel") is None and registry.by_gguf_architecture("gpt2") is None


def test_registry_imports_no_torch():
    code = ("import sys; import turboinfer.models.registry, turboinfer.memory.gguf_header; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_only_the_llama_family_has_the_c_decode_step():
    assert LLAMA.has_c_decode_step and not GEMMA3.has_c_decode_step


CONFIGS = {  # transformers config class -> overrides: each family member, and Llama with every bias it allows
    "LlamaConfig": dict(attention_bias=True, mlp_bias=True), "MistralConfig": dict(sliding_window=32),
    "Qwen2Config": {}, "Qwen3Config": dict(head_dim=24, attention_bias=True),
    "Gemma3TextConfig": dict(head_dim=32, sliding_window=16),
}


@pytest.mark.parametrize("cls_name", sorted(CONFIGS))
def test_estimated_shape_is_the_built_model(cls_name):
    """The estimator's parameter inventory (from the descriptor: norms per layer, biases, windows) equals the
    parameters of the model class the descriptor builds, and transformers' for the same config."""
    import transformers

    cfg = getattr(transformers, cls_name)(**{**TINY, **CONFIGS[cls_name]})
    arch = registry.arch_from_hf_config(cfg.to_dict())
    model = registry.build_model(arch, torch.device("meta"), torch.float32)
    assert num_params(arch) == num_params(cfg.to_dict()) == sum(p.numel() for p in model.parameters())
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(cfg)
    assert num_params(arch) == sum(p.numel() for p in hf.parameters())
    windows = tuple(layer.self_attn.attn.sliding_window for layer in model.model.layers)
    assert model_shape(arch).layer_windows == windows


def test_llama_biases_match_transformers(tmp_path):
    """HF Llama's attention_bias puts a bias on o_proj too, and mlp_bias on gate/up/down: logits agree."""
    import transformers

    cfg = transformers.LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.normal_(0, 0.15 if p.dim() >= 2 else 0.05)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    resolved = resolve_model(str(tmp_path))
    model = registry.build_model(load_arch(resolved), torch.device("cpu"), torch.float32)
    load_weights_into(model, resolved, torch.device("cpu"))
    ids = torch.randint(3, TINY["vocab_size"], (20,), generator=torch.Generator().manual_seed(1))
    with calibration_batch(model, len(ids)) as (positions, meta), torch.inference_mode():
        ours = model.compute_logits(model(ids, positions, meta)).float()
    with torch.no_grad():
        ref = hf(ids[None]).logits[0].float()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
