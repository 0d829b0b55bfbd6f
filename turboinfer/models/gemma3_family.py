"""The Gemma 3 text family's descriptor (model code: models/gemma3.py): Gemma3ForCausalLM, the 270M and 1B
checkpoints (the larger Gemma 3 models are vision-language ones). Five sliding-window layers (local RoPE base
10,000) to one global layer by default, four norms a layer, norms stored as 1 + w by llama.cpp."""

from __future__ import annotations

from typing import Any

from turboinfer.errors import UnsupportedModelError
from turboinfer.models.arch import ModelArch
from turboinfer.models.family import ModelFamily, eos_ids, hf_architecture, require_fields, saved_dtype
from turboinfer.models.gguf_config import LAYER_TENSORS, GGUFSource, base_config, f32

LAYER_TYPES = ("sliding_attention", "full_attention")


def _pattern_types(pattern: int, num_layers: int) -> list[str]:
    """Every `pattern`-th layer global, the others sliding (HF's and llama.cpp's default for Gemma 3)."""
    return ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]


def parse_config(cfg: dict[str, Any]) -> ModelArch:
    require_fields(cfg)
    rope = cfg.get("rope_parameters") or {}
    if "full_attention" in rope:  # transformers >= 5: one entry per layer type
        full, local = dict(rope["full_attention"]), dict(rope.get("sliding_attention") or {})
    else:
        full = {"rope_theta": cfg.get("rope_theta", 1_000_000.0), **(cfg.get("rope_scaling") or rope or {})}
        local = {"rope_theta": cfg.get("rope_local_base_freq", 10_000.0)}
    rope_theta = float(full.pop("rope_theta", cfg.get("rope_theta", 1_000_000.0)))
    kind = full.get("rope_type", full.get("type", "default"))
    scaling = None if kind == "default" else {**full, "rope_type": kind}
    local_kind = local.get("rope_type", local.get("type", "default"))
    if local_kind != "default":
        raise UnsupportedModelError(f"Gemma 3 local-layer RoPE scaling {local_kind!r} is not supported")
    num_layers = int(cfg["num_hidden_layers"])
    types = cfg.get("layer_types") or _pattern_types(
        int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6), num_layers)
    if len(types) != num_layers or set(types) - set(LAYER_TYPES):
        raise UnsupportedModelError(f"Gemma 3 layer_types {types!r} do not fit {num_layers} layers")
    if cfg.get("attn_logit_softcapping") is not None:
        raise UnsupportedModelError(f"Gemma 3 attn_logit_softcapping={cfg['attn_logit_softcapping']!r} is not "
                                    "supported")
    num_heads = int(cfg["num_attention_heads"])
    window = cfg.get("sliding_window")
    cap = cfg.get("final_logit_softcapping")
    bias = bool(cfg.get("attention_bias", False))
    return ModelArch(
        architecture=hf_architecture(GEMMA3, cfg),
        model_type="gemma3_text",
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
        head_dim=int(cfg.get("head_dim") or 256),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        attention_bias=bias,
        qk_norm=True,
        sliding_window=int(window) if window else None,
        hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg),
        torch_dtype=saved_dtype(cfg),
        o_bias=bias,  # HF Gemma 3: attention_bias covers q/k/v/o
        layer_types=tuple(types) if window else None,
        rope_local_theta=float(local.get("rope_theta", 10_000.0)),
        query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or int(cfg.get("head_dim") or 256)),
        final_logit_softcapping=float(cap) if cap else None,
    )


def gguf_config(src: GGUFSource) -> dict[str, Any]:
    """What llama.cpp's gemma3 graph fixes in code rather than in the file: every 6th layer is global, the
    sliding layers use RoPE base 10,000, queries are scaled by head_dim^-1/2 (query_pre_attn_scalar =
    head_dim for the 270M, 1B, 4B and 12B checkpoints; 27B, which scales by hidden/heads, is refused)."""
    cfg = base_config(src, "Gemma3ForCausalLM", "gemma3_text")
    num_layers, num_heads, hidden = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["hidden_size"]
    head_dim = cfg["head_dim"]
    if num_layers == 62 and hidden // num_heads != head_dim:
        raise UnsupportedModelError(f"{src.path}: Gemma 3 27B (query scale hidden/heads) is not supported")
    pattern = src.metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):  # newer converters: one flag per layer, true where the layer slides
        types = ["sliding_attention" if p else "full_attention" for p in pattern]
    else:
        types = _pattern_types(int(pattern or 6), num_layers)
    cap = src.metadata.get("gemma3.final_logit_softcapping")
    return {**cfg, "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
            "sliding_window": int(src.uniform("attention.sliding_window", 512)), "layer_types": types,
            "rope_local_base_freq": f32(src.metadata.get("gemma3.rope.freq_base_swa", 10000.0)),
            "query_pre_attn_scalar": head_dim, "final_logit_softcapping": f32(cap) if cap else None}


GEMMA3 = ModelFamily(
    name="gemma3",
    hf_architectures={"Gemma3ForCausalLM": "gemma3_text"},
    parse_config=parse_config,
    gguf_architectures=("gemma3",),
    gguf_config=gguf_config,
    # Gemma 3 normalises each sublayer's output too; its "ffn_norm" is the MLP's input norm.
    gguf_layer_tensors={**LAYER_TENSORS, "ffn_norm": "pre_feedforward_layernorm",
                        "post_attention_norm": "post_attention_layernorm",
                        "post_ffw_norm": "post_feedforward_layernorm"},
    gguf_qk_permuted=frozenset(),
    # llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by the weight alone); the
    # HF checkpoint, and so the loader's output, holds w.
    gguf_norm_offset=1.0,
    model_class="turboinfer.models.gemma3:Gemma3ForCausalLM",
    norms_per_layer=4,
    # decode.c's layer is Llama's: two norms, SiLU, no q/k norms
    has_c_decode_step=False,
)
