"""The numbers memory depends on, for more model families than the engine runs.

`ModelShape` is what every estimate reads. The engine's own families (models/registry.py) come through their
descriptor: an HF config.json dict is parsed by the family's `parse_config` into a `models.arch.ModelArch`, and
GGUF metadata (`gguf_header.py`) is first translated by the same family, exactly as the loader does, so a model
has one shape whichever file describes it. Families the engine does not run yet (`_LAYOUTS`: Gemma 1/2, Phi-3,
Granite, Mixtral, Qwen MoE, DeepSeek-V2/V3 with multi-head latent attention) are read here from their config.
Reading needs only the config numbers: no weights, no transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from turboinfer.errors import InvalidRequestError, UnsupportedModelError
from turboinfer.models import registry

DTYPE_BYTES = {"float32": 4, "float": 4, "bfloat16": 2, "float16": 2, "half": 2, "int8": 1, "uint8": 1, "fp8": 1,
               "float8_e4m3fn": 1, "float8_e5m2": 1}


def dtype_name(dtype: Any) -> str:
    """'bfloat16', torch.bfloat16 or 'torch.bfloat16' -> 'bfloat16' (no torch import needed)."""
    return str(dtype).replace("torch.", "")


def dtype_bytes(dtype: Any) -> int:
    name = dtype_name(dtype)
    if name not in DTYPE_BYTES:
        raise InvalidRequestError(f"unknown dtype {name!r}; expected one of float32, bfloat16, float16, int8, fp8")
    return DTYPE_BYTES[name]


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only transformer as far as memory is concerned."""

    model_type: str  # HF model_type ("llama", "gemma2", "deepseek_v2", ...): selects the parameter layout
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # == num_heads: MHA; 1: MQA; otherwise GQA (MLA: unused, the latent is shared)
    head_dim: int  # width of one query/key head (MLA: qk_nope_head_dim + qk_rope_head_dim)
    v_head_dim: int  # width of one value head (== head_dim except MLA)
    intermediate_size: int  # dense MLP width
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry a bias
    o_bias: bool  # output projection carries a bias
    mlp_bias: bool
    qk_norm: bool  # per-head RMSNorm weights on q and k (Qwen3, Gemma 3)
    norms_per_layer: int  # hidden-width RMSNorms per layer: 2 (Llama), 4 (Gemma 2/3: pre/post each block)
    fused_qkv: bool  # one qkv_proj / gate_up_proj tensor instead of three / two (Phi-3): same bytes
    layer_windows: tuple[int | None, ...]  # per layer: sliding-window length, or None for full attention
    max_position_embeddings: int
    torch_dtype: str  # dtype the checkpoint was saved in
    # Multi-head latent attention (DeepSeek-V2/V3); kv_lora_rank None for ordinary attention.
    kv_lora_rank: int | None = None  # width of the compressed KV latent that MLA caches
    q_lora_rank: int | None = None  # width of the compressed query (None: plain q_proj)
    qk_rope_head_dim: int = 0  # decoupled RoPE key width, cached next to the latent
    # Mixture of experts; num_experts 0 for dense models.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0  # width of one routed expert
    shared_expert_intermediate_size: int = 0  # total width of the always-on shared expert(s); 0: none
    shared_expert_gate: bool = False  # Qwen2-MoE's sigmoid gate [1, hidden] on the shared expert
    router_bias: bool = False  # DeepSeek-V3's e_score_correction_bias [num_experts]
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts instead of the dense MLP
    notes: tuple[str, ...] = ()  # caveats found while reading the config, shown with the estimate

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank is not None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


# model_type -> parameter layout, for the families the engine does not run (its own come from their descriptor)
_LAYOUTS = {
    "granite": "llama", "phi3": "llama", "gemma": "llama", "gemma2": "llama",
    "mixtral": "moe", "qwen2_moe": "moe", "qwen3_moe": "moe",
    "deepseek_v2": "mla", "deepseek_v3": "mla",
}
_ARCH_TO_TYPE = {
    **{a: t for f in registry.FAMILIES for a, t in f.hf_architectures.items()},
    "GraniteForCausalLM": "granite", "Phi3ForCausalLM": "phi3", "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2", "Gemma3ForConditionalGeneration": "gemma3", "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe", "Qwen3MoeForCausalLM": "qwen3_moe",
    "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
}


def _first(cfg: dict, *keys: str, default: Any = None) -> Any:
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


def _require(cfg: dict, model_type: str, groups: list[tuple[str, ...]]) -> None:
    """Each group lists the spellings one number goes by; a group with none present is missing."""
    missing = [" or ".join(g) for g in groups if all(cfg.get(k) is None for k in g)]
    if missing:
        raise UnsupportedModelError(f"the {model_type} config lacks {', '.join(missing)}; the memory estimate "
                                    "needs these numbers (add them to config.json)")


def _windows(cfg: dict, model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if types:
        if len(types) != num_layers:
            raise UnsupportedModelError(f"layer_types lists {len(types)} layers but num_hidden_layers is {num_layers}")
        return tuple(int(window) if t == "sliding_attention" and window else None for t in types)
    if not window:
        return (None,) * num_layers
    if model_type == "gemma2":  # even layers slide, odd layers see everything
        return tuple(int(window) if i % 2 == 0 else None for i in range(num_layers))
    if model_type in ("qwen2_moe", "qwen3_moe"):
        if not cfg.get("use_sliding_window"):
            return (None,) * num_layers
        first = int(cfg.get("max_window_layers", 0))
        return tuple(int(window) if i >= first else None for i in range(num_layers))
    return (int(window),) * num_layers  # Phi-3, Mixtral: every layer


def shape_from_hf_config(cfg: dict[str, Any]) -> ModelShape:
    """An HF config.json dict -> ModelShape; unknown families and missing numbers raise with their names."""
    notes: list[str] = []
    arch = (cfg.get("architectures") or [None])[0]
    model_type = cfg.get("model_type") or _ARCH_TO_TYPE.get(arch or "", "")
    if isinstance(cfg.get("text_config"), dict) and "hidden_size" not in cfg:
        text = cfg["text_config"]
        model_type = text.get("model_type") or f"{model_type}_text"
        cfg = {"tie_word_embeddings": cfg.get("tie_word_embeddings", True), **text}
        notes.append("multimodal checkpoint: only the language model is counted (the vision encoder is not)")
    engine_family = registry.by_model_type(model_type)
    if engine_family is None and model_type not in _LAYOUTS:
        known = ", ".join(sorted({*_LAYOUTS, *(t for f in registry.FAMILIES for t in f.hf_architectures.values())}))
        raise UnsupportedModelError(f"model type {model_type or arch or '<missing>'!r} is not known to the memory "
                                    f"estimator (known: {known})")
    family = _LAYOUTS.get(model_type, "llama")
    groups = [("vocab_size",), ("hidden_size",), ("num_hidden_layers",), ("num_attention_heads",)]
    if family == "mla":
        groups += [("kv_lora_rank",), ("qk_rope_head_dim",), ("qk_nope_head_dim",), ("v_head_dim",),
                   ("intermediate_size",), ("moe_intermediate_size",), ("n_routed_experts", "num_local_experts"),
                   ("num_experts_per_tok",)]
    elif family == "moe":
        groups += [("num_local_experts", "num_experts"), ("num_experts_per_tok",)]
        groups += [("intermediate_size",)] if model_type == "mixtral" else [("moe_intermediate_size",)]
    else:
        groups += [("intermediate_size",)]
    _require(cfg, model_type, groups)
    num_layers = int(cfg["num_hidden_layers"])
    num_heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    if hidden <= 0 or num_layers <= 0 or num_heads <= 0:
        raise UnsupportedModelError("hidden_size, num_hidden_layers and num_attention_heads must be positive")
    if engine_family is not None:  # the engine's own parse; model_type picks the class (the layout is the same)
        shape = shape_from_arch(engine_family.parse_config({**cfg, "architectures": None, "model_type": model_type}))
        _check(shape)
        return with_notes(shape, *notes)
    head_dim = int(cfg.get("head_dim") or hidden // num_heads)
    bias = bool(cfg.get("attention_bias", False))
    kw: dict[str, Any] = dict(
        model_type=model_type, vocab_size=int(cfg["vocab_size"]), hidden_size=hidden, num_layers=num_layers,
        num_heads=num_heads, num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads), head_dim=head_dim,
        v_head_dim=head_dim, intermediate_size=int(cfg.get("intermediate_size") or 0),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type.startswith("gemma"))),
        qkv_bias=bias, o_bias=bias, mlp_bias=bool(cfg.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3_moe",
        norms_per_layer=4 if model_type == "gemma2" else 2, fused_qkv=model_type == "phi3",
        layer_windows=_windows(cfg, model_type, num_layers),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
        torch_dtype=dtype_name(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"))
    if model_type == "qwen2_moe":  # bias on q/k/v only
        kw.update(qkv_bias=bool(cfg.get("qkv_bias", True)), o_bias=False)
    elif model_type in ("mixtral", "phi3"):
        kw.update(qkv_bias=False, o_bias=False)
    if family == "moe":
        experts = int(_first(cfg, "num_local_experts", "num_experts"))
        sparse_step = int(cfg.get("decoder_sparse_step", 1))
        dense_only = set(cfg.get("mlp_only_layers") or ())
        kw.update(num_experts=experts, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                  moe_intermediate_size=int(_first(cfg, "moe_intermediate_size", "intermediate_size")),
                  shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size") or 0),
                  shared_expert_gate=model_type == "qwen2_moe" and bool(cfg.get("shared_expert_intermediate_size")),
                  moe_layers=tuple(experts > 0 and i not in dense_only and (i + 1) % sparse_step == 0
                                   for i in range(num_layers)))
    if family == "mla":
        nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
        first_dense, freq = int(cfg.get("first_k_dense_replace", 0)), int(cfg.get("moe_layer_freq", 1))
        experts = int(_first(cfg, "n_routed_experts", "num_local_experts"))
        kw.update(head_dim=nope + rope, v_head_dim=int(cfg["v_head_dim"]), num_kv_heads=num_heads,
                  kv_lora_rank=int(cfg["kv_lora_rank"]), q_lora_rank=cfg.get("q_lora_rank"),
                  qk_rope_head_dim=rope, num_experts=experts, num_experts_per_tok=int(cfg["num_experts_per_tok"]),
                  moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                  shared_expert_intermediate_size=int(cfg["moe_intermediate_size"]) * int(cfg.get("n_shared_experts")
                                                                                           or 0),
                  router_bias=model_type == "deepseek_v3",
                  moe_layers=tuple(experts > 0 and i >= first_dense and i % freq == 0 for i in range(num_layers)))
        if kw["q_lora_rank"] is not None:
            kw["q_lora_rank"] = int(kw["q_lora_rank"])
    shape = ModelShape(**kw, notes=tuple(notes))
    _check(shape)
    return shape


def _check(s: ModelShape) -> None:
    if not s.is_mla and s.num_heads % s.num_kv_heads:
        raise UnsupportedModelError(f"num_attention_heads {s.num_heads} is not a multiple of num_key_value_heads "
                                    f"{s.num_kv_heads}")


def shape_from_arch(arch: Any) -> ModelShape:
    """models.arch.ModelArch (the engine's parsed config) -> ModelShape; what the arch does not say (norms per
    layer) its family's descriptor does."""
    return ModelShape(
        model_type=arch.model_type, vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
        num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
        head_dim=arch.head_dim, v_head_dim=arch.head_dim, intermediate_size=arch.intermediate_size,
        tie_word_embeddings=arch.tie_word_embeddings, qkv_bias=arch.attention_bias, o_bias=arch.o_bias,
        mlp_bias=arch.mlp_bias, qk_norm=arch.qk_norm, norms_per_layer=registry.family_of(arch).norms_per_layer,
        fused_qkv=False, layer_windows=tuple(arch.layer_window(i) for i in range(arch.num_layers)),
        max_position_embeddings=arch.max_position_embeddings, torch_dtype=dtype_name(arch.torch_dtype))


def model_shape(arch: Any) -> ModelShape:
    """Accepts a ModelShape, a models.arch.ModelArch or an HF config dict."""
    if isinstance(arch, ModelShape):
        return arch
    if isinstance(arch, dict):
        return shape_from_hf_config(arch)
    if hasattr(arch, "num_kv_heads") and hasattr(arch, "architecture"):
        return shape_from_arch(arch)
    raise TypeError(f"expected a ModelShape, ModelArch or HF config dict, got {type(arch).__name__}")


def with_notes(shape: ModelShape, *notes: str) -> ModelShape:
    return replace(shape, notes=shape.notes + tuple(notes))
