"""`ModelArch`: the numbers a model file needs, whichever checkpoint format they came from. A family's
`parse_config` (models/<family>_family.py) builds one from an HF config.json dict; GGUF metadata is first
translated into such a dict by the same family, so both formats meet in one parse. No torch here: the memory
estimator reads these numbers too."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArch:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"; selects the family and its model class
    model_type: str  # HF model_type: "llama" | "mistral" | "qwen2" | "qwen3" | "gemma3_text"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # == num_heads: MHA; 1: MQA; otherwise GQA
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None  # HF rope_scaling / rope_parameters minus rope_theta; None for plain RoPE
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2; Llama / Qwen3 / Gemma 3 with attention_bias)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3, Gemma 3)
    sliding_window: int | None  # Mistral/Qwen window; None when every layer attends to the full context
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # dtype the checkpoint was saved in ("float32", "bfloat16", ...)
    # Biases HF puts beside attention_bias in some families (the defaults are every released checkpoint's):
    o_bias: bool = False  # o_proj carries a bias (HF Llama, Qwen3 and Gemma 3 tie it to attention_bias)
    mlp_bias: bool = False  # gate/up/down carry biases (HF Llama's mlp_bias)
    # Gemma 3 only (the defaults are every other family's):
    layer_types: tuple[str, ...] | None = None  # per layer "sliding_attention" | "full_attention"; None: all alike
    rope_local_theta: float | None = None  # RoPE base of the sliding-window layers (the full ones use rope_theta)
    query_pre_attn_scalar: float | None = None  # attention scale = its -1/2 power (default: head_dim's)
    final_logit_softcapping: float | None = None  # logits = cap * tanh(logits / cap)

    def layer_window(self, i: int) -> int | None:
        """The attention window of layer i (None: the whole context)."""
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[i] == "sliding_attention" else None
