"""Every parameter tensor of a model, from its shape alone, and what the weights cost in bytes.

The inventory follows the HF module layout of each family (names end like the checkpoint's), so counts equal
`sum(p.numel() for p in model.parameters())` of the transformers model; tests check that per family.
Tensor parallelism follows the Megatron layout vLLM uses: q/gate/up (and MLA's q_b/kv_b) split by output
rows, o/down split by input columns, k/v split by KV head (replicated when there are fewer KV heads than ranks),
embedding and LM head split by vocabulary rows, norms, routers and MLA's down-projections replicated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from turboinfer.errors import InvalidRequestError
from turboinfer.memory.shapes import ModelShape, dtype_bytes, dtype_name, model_shape

QUANTIZATIONS = (None, "int8", "int4", "nf4")
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights ...
NF4_STATS_BLOCK = 256  # ... itself quantized to 8 bits with one float32 scale per 256 absmax values
INT4_GROUP_SIZES = (32, 64, 128, 256)  # group sizes torch's int4 matmul kernel accepts


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]  # torch order; linear weights [out_features, in_features], experts [E, out, in]
    role: str  # "embed" | "lm_head" | "linear" | "expert" | "router" | "norm" | "bias": what quantization touches
    split: str  # tensor-parallel layout: "col" | "row" | "kv" | "qkv" | "vocab" | "rep" (see module docstring)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def module(self) -> str:
        """'model.layers.3.self_attn.q_proj.weight' -> 'q_proj' (what LoRA target_modules name)."""
        parts = self.name.split(".")
        return parts[-2] if len(parts) >= 2 else parts[0]


def _linear(out: list, prefix: str, rows: int, cols: int, split: str, bias: bool, role: str = "linear") -> None:
    out.append(ParamTensor(f"{prefix}.weight", (rows, cols), role, split))
    if bias:  # a row-parallel layer adds its bias once, after the all-reduce: replicated
        out.append(ParamTensor(f"{prefix}.bias", (rows,), "bias", "rep" if split == "row" else split))


def _mlp(out: list, prefix: str, s: ModelShape, width: int, bias: bool = False) -> None:
    h = s.hidden_size
    if s.fused_qkv:
        _linear(out, f"{prefix}.gate_up_proj", 2 * width, h, "col", bias)
    else:
        _linear(out, f"{prefix}.gate_proj", width, h, "col", bias)
        _linear(out, f"{prefix}.up_proj", width, h, "col", bias)
    _linear(out, f"{prefix}.down_proj", h, width, "row", bias)


def _attention(out: list, p: str, s: ModelShape) -> None:
    h = s.hidden_size
    if s.is_mla:
        nope = s.head_dim - s.qk_rope_head_dim
        if s.q_lora_rank:
            _linear(out, f"{p}.q_a_proj", s.q_lora_rank, h, "rep", s.qkv_bias)
            out.append(ParamTensor(f"{p}.q_a_layernorm.weight", (s.q_lora_rank,), "norm", "rep"))
            _linear(out, f"{p}.q_b_proj", s.q_size, s.q_lora_rank, "col", False)
        else:
            _linear(out, f"{p}.q_proj", s.q_size, h, "col", False)
        _linear(out, f"{p}.kv_a_proj_with_mqa", s.kv_lora_rank + s.qk_rope_head_dim, h, "rep", s.qkv_bias)
        out.append(ParamTensor(f"{p}.kv_a_layernorm.weight", (s.kv_lora_rank,), "norm", "rep"))
        _linear(out, f"{p}.kv_b_proj", s.num_heads * (nope + s.v_head_dim), s.kv_lora_rank, "col", False)
        _linear(out, f"{p}.o_proj", h, s.num_heads * s.v_head_dim, "row", s.o_bias)
        return
    if s.fused_qkv:
        _linear(out, f"{p}.qkv_proj", s.q_size + 2 * s.kv_size, h, "qkv", s.qkv_bias)
    else:
        _linear(out, f"{p}.q_proj", s.q_size, h, "col", s.qkv_bias)
        _linear(out, f"{p}.k_proj", s.kv_size, h, "kv", s.qkv_bias)
        _linear(out, f"{p}.v_proj", s.num_kv_heads * s.v_head_dim, h, "kv", s.qkv_bias)
    _linear(out, f"{p}.o_proj", h, s.num_heads * s.v_head_dim, "row", s.o_bias)
    if s.qk_norm:
        out.append(ParamTensor(f"{p}.q_norm.weight", (s.head_dim,), "norm", "rep"))
        out.append(ParamTensor(f"{p}.k_norm.weight", (s.head_dim,), "norm", "rep"))


_NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
               "post_feedforward_layernorm")


def param_tensors(arch) -> list[ParamTensor]:
    """Every parameter tensor once (a tied LM head is the embedding, so it is not listed twice)."""
    s = model_shape(arch)
    h = s.hidden_size
    out = [ParamTensor("model.embed_tokens.weight", (s.vocab_size, h), "embed", "vocab")]
    for i in range(s.num_layers):
        p = f"model.layers.{i}"
        _attention(out, f"{p}.self_attn", s)
        for name in _NORM_NAMES[:s.norms_per_layer]:
            out.append(ParamTensor(f"{p}.{name}.weight", (h,), "norm", "rep"))
        if s.moe_layers and s.moe_layers[i]:
            m, e, w = f"{p}.mlp", s.num_experts, s.moe_intermediate_size
            out.append(ParamTensor(f"{m}.gate.weight", (e, h), "router", "rep"))
            if s.router_bias:
                out.append(ParamTensor(f"{m}.gate.e_score_correction_bias", (e,), "router", "rep"))
            out.append(ParamTensor(f"{m}.experts.gate_up_proj", (e, 2 * w, h), "expert", "col"))
            out.append(ParamTensor(f"{m}.experts.down_proj", (e, h, w), "expert", "row"))
            if s.shared_expert_intermediate_size:
                shared = f"{m}.shared_experts" if s.is_mla else f"{m}.shared_expert"
                _mlp(out, shared, s, s.shared_expert_intermediate_size)
            if s.shared_expert_gate:
                out.append(ParamTensor(f"{m}.shared_expert_gate.weight", (1, h), "router", "rep"))
        else:
            _mlp(out, f"{p}.mlp", s, s.intermediate_size, s.mlp_bias)
    out.append(ParamTensor("model.norm.weight", (h,), "norm", "rep"))
    if not s.tie_word_embeddings:
        out.append(ParamTensor("lm_head.weight", (s.vocab_size, h), "lm_head", "vocab"))
    return out


def check_tp(s: ModelShape, tp_size: int) -> None:
    if tp_size < 1:
        raise InvalidRequestError(f"--tensor-parallel-size must be >= 1, got {tp_size}")
    if s.num_heads % tp_size:
        raise InvalidRequestError(f"tensor parallel size {tp_size} does not divide the {s.num_heads} attention heads")
    if not s.is_mla and s.num_kv_heads % tp_size and tp_size % s.num_kv_heads:
        raise InvalidRequestError(f"tensor parallel size {tp_size} and the {s.num_kv_heads} KV heads do not divide "
                                  "one another, so KV heads cannot be split or replicated evenly")


def kv_heads_per_rank(s: ModelShape, tp_size: int) -> int:
    """KV heads each rank stores: split when there are enough, else each rank keeps one (replicated)."""
    return max(1, s.num_kv_heads // tp_size)


def shard_shape(t: ParamTensor, s: ModelShape, tp_size: int) -> tuple[int, ...]:
    """The part of `t` one rank holds."""
    if tp_size == 1 or t.split == "rep":
        return t.shape
    shape = list(t.shape)
    kv = kv_heads_per_rank(s, tp_size)
    out_dim = -2 if len(shape) >= 2 else -1
    if t.split == "col":
        shape[out_dim] = -(-shape[out_dim] // tp_size)
    elif t.split == "row":
        shape[-1] = -(-shape[-1] // tp_size)
    elif t.split == "kv":
        shape[out_dim] = shape[out_dim] // s.num_kv_heads * kv
    elif t.split == "qkv":
        shape[out_dim] = s.q_size // tp_size + kv * (s.head_dim + s.v_head_dim)
    elif t.split == "vocab":
        shape[0] = -(-shape[0] // tp_size)
    return tuple(shape)


def int4_group_size(in_features: int, requested: int) -> int | None:
    """The engine's rule (layers/quantization): the largest kernel group size <= requested dividing in_features;
    None leaves the layer in float."""
    fits = [g for g in INT4_GROUP_SIZES if g <= requested and in_features % g == 0]
    return max(fits) if fits else None


def tensor_bytes(shape: tuple[int, ...], role: str, dtype: str, quantization: str | None = None,
                 group_size: int = 128) -> int:
    """Bytes of one tensor. Quantization applies to linear/expert weights only; embeddings, LM head, norms,
    biases and routers stay in `dtype`. The formats are the engine's (layers/quantization):
      int8: symmetric per output channel: 1 byte per weight + a float32 scale per row
      int4: 1/2 byte per weight + a bfloat16 scale and zero point per group of `group_size` inputs (the largest
            of 256/128/64/32 not above it that divides the row; none: the layer stays in `dtype`)
      nf4:  bitsandbytes 4-bit with double quantization (QLoRA): 1/2 byte per weight + an 8-bit absmax per 64
            weights + a float32 scale per 256 absmax values"""
    numel = math.prod(shape)
    elem = dtype_bytes(dtype)
    if quantization is None or role not in ("linear", "expert") or len(shape) < 2:
        return numel * elem
    if quantization == "nf4":
        blocks = -(-numel // NF4_BLOCK)
        return -(-numel // 2) + blocks + 4 * -(-blocks // NF4_STATS_BLOCK)
    rows, cols = numel // shape[-1], shape[-1]
    if quantization == "int8":
        return numel + rows * 4
    if quantization == "int4":
        group = int4_group_size(cols, group_size)
        if group is None:
            return numel * elem
        return -(-numel // 2) + rows * (cols // group) * 2 * 2
    raise InvalidRequestError(f"unknown quantization {quantization!r}; expected one of int8, int4, nf4")


def resolve_weight_dtype(s: ModelShape, dtype: str | None) -> str:
    """'auto'/None -> the dtype the checkpoint was saved in."""
    name = dtype_name(dtype) if dtype not in (None, "auto") else s.torch_dtype
    dtype_bytes(name)  # validates
    return name


def weight_bytes_by_role(arch, dtype: str = "auto", quantization: str | None = None, group_size: int = 128,
                         tp_size: int = 1) -> dict[str, int]:
    s = model_shape(arch)
    if quantization not in QUANTIZATIONS:
        raise InvalidRequestError(f"unknown quantization {quantization!r}; expected one of int8, int4, nf4")
    check_tp(s, tp_size)
    dt = resolve_weight_dtype(s, dtype)
    out: dict[str, int] = {}
    for t in param_tensors(s):
        out[t.role] = out.get(t.role, 0) + tensor_bytes(shard_shape(t, s, tp_size), t.role, dt, quantization,
                                                        group_size)
    return out


def weight_bytes_from_hf(arch, dtype: str = "auto", quantization: str | None = None, group_size: int = 128,
                         tp_size: int = 1) -> int:
    """Bytes of all weights (per device under tensor parallelism) for a model given by its config.
    dtype 'auto' means the checkpoint's own dtype."""
    return sum(weight_bytes_by_role(arch, dtype, quantization, group_size, tp_size).values())


def num_params(arch) -> int:
    return sum(t.numel for t in param_tensors(arch))


def num_active_params(arch) -> int:
    """Parameters one token passes through: for MoE, only num_experts_per_tok of the routed experts."""
    s = model_shape(arch)
    total = 0
    for t in param_tensors(s):
        total += t.numel * s.num_experts_per_tok // s.num_experts if t.role == "expert" else t.numel
    return total
