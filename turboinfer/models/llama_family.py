"""The Llama family's descriptor (model code: models/llama.py): Llama 2/3/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM2,
TinyLlama. Four HF classes that differ only in config numbers: biases, q/k norms, a uniform sliding window."""

from __future__ import annotations

from typing import Any

from turboinfer.models.arch import ModelArch
from turboinfer.models.family import ModelFamily, eos_ids, hf_architecture, require_fields, saved_dtype
from turboinfer.models.gguf_config import LAYER_TENSORS, GGUFSource, base_config

HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# GGUF general.architecture -> HF class. llama.cpp converts Mistral as "llama" too (see gguf_config).
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}


def parse_config(cfg: dict[str, Any]) -> ModelArch:
    require_fields(cfg)
    arch = hf_architecture(LLAMA, cfg)
    model_type = HF_ARCHITECTURES[arch]
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    # transformers >= 5 keeps rope settings in rope_parameters; older configs in rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or {})
    rope_theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    scaling = cfg.get("rope_scaling") or rope or None
    if scaling is not None:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        scaling["rope_type"] = kind
        if kind == "default":
            scaling = None
    window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
    # HF's attention_bias: q/k/v/o in Llama and Qwen3; Qwen2 always has q/k/v biases and no o bias
    bias = bool(cfg.get("attention_bias", model_type == "qwen2"))
    return ModelArch(
        architecture=arch,
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or hidden // num_heads),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bias,
        qk_norm=model_type == "qwen3",
        sliding_window=int(window) if window else None,
        hidden_act=cfg.get("hidden_act", "silu"),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
        torch_dtype=saved_dtype(cfg),
        o_bias=bias and model_type in ("llama", "qwen3"),
        mlp_bias=bool(cfg.get("mlp_bias", False)) and model_type == "llama",
    )


def gguf_config(src: GGUFSource) -> dict[str, Any]:
    hf_class = GGUF_ARCHITECTURES[src.arch]
    # llama.cpp converts Mistral as "llama"; only the model name tells (transformers reads it the same way)
    if src.arch == "llama" and "mistral" in str(src.metadata.get("general.name", "")).lower():
        hf_class = "MistralForCausalLM"
    return {**base_config(src, hf_class, HF_ARCHITECTURES[hf_class]),
            "mlp_bias": "blk.0.ffn_up.bias" in src.tensor_shapes}


LLAMA = ModelFamily(
    name="llama",
    hf_architectures=HF_ARCHITECTURES,
    parse_config=parse_config,
    gguf_architectures=tuple(GGUF_ARCHITECTURES),
    gguf_config=gguf_config,
    gguf_layer_tensors=LAYER_TENSORS,
    # llama.cpp's converter permutes q/k only in its LlamaModel class (which also converts Mistral checkpoints);
    # its Qwen2/Qwen3 classes write the checkpoint's rows as they are.
    gguf_qk_permuted=frozenset({"llama", "mistral"}),
    gguf_norm_offset=0.0,
    model_class="turboinfer.models.llama:LlamaForCausalLM",
    norms_per_layer=2,
    has_c_decode_step=True,
)
