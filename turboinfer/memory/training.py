"""Fine-tuning memory: weights, gradients, optimizer states, master weights, activations; full, LoRA, QLoRA.

Activations count the tensors autograd saves for backward, the method of Korthikanti et al., "Reducing
Activation Recomputation in Large Transformer Models" (arXiv:2205.05198, section 4.1), applied to the
HF Llama-family layer (RMSNorm, rotary, GQA, gated MLP; no dropout) as transformers computes it. Per layer, for
T = batch * seq_len tokens, a = activation bytes, q = heads*head_dim, kv = kv_heads*head_dim, i = intermediate:
    RMSNorm (x2)   (4 + 2a)*T*h each   input upcast to float32, normalised x cast back, the output (next matmul)
                   + 4*T               1/rms per token
    attention      a*T*(2q + 2kv)      rotated q and k, v, the attention output (= o_proj input)
                   + 4*T*heads         SDPA/FlashAttention log-sum-exp
    eager attn     + a*T*(2q - 2kv) - 4*T*heads + batch*heads*seq^2*(4 + a if a < 4 else 4)
                                        (repeated k/v, and the float32 softmax plus its cast)
    gated MLP      4*a*T*i             gate, up, act(gate), act(gate)*up (= down_proj input)
  head             (4 + 2a)*T*h + 4*T*V + 20*T   final norm, float32 log-softmax of the logits, ids and labels
                   + 2*seq*head_dim*a          rotary cos/sin, shared by all layers
tests/memory/test_memory.py checks the sum against the bytes saved by a transformers Llama training step.
Gradient checkpointing (one checkpoint per layer, as HF's gradient_checkpointing_enable) keeps a*T*h per layer
and the head; during backward one layer is recomputed, so the peak adds one layer's activations.
LoRA: frozen linear layers need not save their input unless an adapter on the same input does; each adapter
saves its rank-r intermediate (and, float32 adapters on 16-bit activations, a float32 copy of its input, as
peft casts it). MoE and MLA layers use the same counting with their widths; only dense Llama layers are measured.

Totals add every part: weights + master weights + gradients + optimizer states + activation peak (+ runtime).
That is the footprint of a step in which gradients from the previous step are still allocated
(zero_grad(set_to_none=False)); with set_to_none the peak is lower by up to min(gradients, activations).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from turboinfer.errors import InvalidRequestError
from turboinfer.memory.inference import CPU_RUNTIME_BYTES, CUDA_CONTEXT_BYTES, CUDA_WORKSPACE_BYTES
from turboinfer.memory.params import ParamTensor, param_tensors, tensor_bytes
from turboinfer.memory.shapes import ModelShape, dtype_bytes, dtype_name, model_shape

MODES = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj", "gate_up_proj",
              "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")
BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps 32-bit states for smaller tensors
BNB_BLOCK = 256  # 8-bit optimizer states: one float32 absmax per 256 values
ADAM_STEP_BYTES = 4  # torch.optim.AdamW keeps `step` as a float32 scalar tensor per parameter


def optimizer_state_bytes(numel: int, optimizer: str, state_dtype: str) -> int:
    """Optimizer state of one parameter tensor.
      adamw:     exp_avg and exp_avg_sq in state_dtype + the float32 step scalar
      adamw8bit: bitsandbytes 8-bit Adam: two uint8 states + a float32 absmax per 256 values per state
                 (32-bit states for tensors under 4096 values)
      sgd:       one momentum buffer in state_dtype (plain SGD without momentum keeps nothing)"""
    elem = dtype_bytes(state_dtype)
    if optimizer == "adamw":
        return 2 * numel * elem + ADAM_STEP_BYTES
    if optimizer == "adamw8bit":
        if numel < BNB_MIN_8BIT_SIZE:
            return 2 * numel * 4
        return 2 * numel + 2 * 4 * -(-numel // BNB_BLOCK)
    if optimizer == "sgd":
        return numel * elem
    raise InvalidRequestError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")


def lora_adapters(s: ModelShape, targets, rank: int) -> list[ParamTensor]:
    """LoRA A [r, in] and B [out, r] for every targeted linear weight ('all-linear' targets every projection)."""
    if rank < 1:
        raise InvalidRequestError(f"--lora-rank must be >= 1, got {rank}")
    names = set(ALL_LINEAR if targets in ("all-linear", None) else targets)
    out = []
    for t in param_tensors(s):
        if t.role == "linear" and t.name.endswith(".weight") and t.module in names:
            rows, cols = t.shape
            prefix = t.name[:-len(".weight")]
            out.append(ParamTensor(f"{prefix}.lora_A.weight", (rank, cols), "lora", "rep"))
            out.append(ParamTensor(f"{prefix}.lora_B.weight", (rows, rank), "lora", "rep"))
    if not out:
        have = sorted({t.module for t in param_tensors(s) if t.role == "linear"})
        raise InvalidRequestError(f"LoRA target modules {sorted(names)} match no linear layer; this model has "
                                  f"{', '.join(have)}")
    return out


def _layer_activations(s: ModelShape, tokens: int, batch: int, seq: int, a: int, attention: str,
                       lora: dict | None, lora_bytes: int) -> int:
    """Saved bytes of one decoder layer (see the module docstring). lora: target module -> rank, or None."""
    t, h, heads = tokens, s.hidden_size, s.num_heads
    q, kv = s.q_size, s.kv_size
    norm = (4 + 2 * a) * h
    attn_in = mlp_in = a * h  # inputs of the projections, part of `norm`
    if s.is_mla:  # rotated q, k and v per head, output; plus the compressed q and kv latents
        attn = a * (heads * s.head_dim * 2 + heads * s.v_head_dim * 2 + (s.q_lora_rank or 0)
                    + s.kv_lora_rank + s.qk_rope_head_dim) + 4 * heads
    else:
        attn = a * (2 * q + 2 * kv) + 4 * heads
        if attention == "eager":
            attn += a * (2 * q - 2 * kv) - 4 * heads
    if s.num_experts and any(s.moe_layers):
        width = s.num_experts_per_tok * s.moe_intermediate_size + s.shared_expert_intermediate_size
        mlp = 4 * a * width + 8 * s.num_experts  # + float32 router logits and probabilities
        down_in = a * width
    else:
        mlp = 4 * a * s.intermediate_size
        down_in = a * s.intermediate_size
    extra_norms = (s.norms_per_layer - 2) * (4 + a) * h + ((4 + a) * (q + kv) if s.qk_norm else 0)
    per_token = 2 * norm + attn + mlp + extra_norms + 8
    if lora is not None:  # frozen projections keep no input unless an adapter reads the same tensor
        if not lora.keys() & {"q_proj", "k_proj", "v_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa"}:
            per_token -= attn_in
        if not lora.keys() & {"gate_proj", "up_proj", "gate_up_proj"}:
            per_token -= mlp_in
        if "down_proj" not in lora:
            per_token -= down_in
        for width_in, r in lora.values():
            per_token += r * lora_bytes + (width_in * lora_bytes if lora_bytes > a else 0)
    total = t * per_token
    if attention == "eager":
        total += batch * heads * seq * seq * (4 + (a if a < 4 else 0))
    return total


def _head_activations(s: ModelShape, tokens: int, seq: int, a: int) -> int:
    # + the rotary cos/sin tables [seq, head_dim], computed once and saved by every layer
    return tokens * ((4 + 2 * a) * s.hidden_size + 4 * s.vocab_size + 20) + 2 * seq * s.head_dim * a


@dataclass
class TrainingEstimate:
    model: str
    mode: str  # full | lora | qlora
    optimizer: str
    dtype: str  # parameter / activation dtype
    master_weights: bool  # float32 copy of the trainable weights for the optimizer (mixed precision)
    batch_size: int
    seq_len: int
    gradient_checkpointing: bool
    num_params: int
    num_trainable_params: int
    weights: int  # the model's weights (LoRA: frozen base + adapters; QLoRA: 4-bit base + adapters)
    master: int
    gradients: int  # of trainable parameters, in their dtype
    optimizer_states: int
    activations: int  # peak: saved tensors (+ one recomputed layer with checkpointing)
    activations_saved: int  # what autograd holds at the end of the forward pass
    runtime: list[tuple[str, int, str]]
    notes: list[str] = field(default_factory=list)
    device_memory: int | None = None

    @property
    def total(self) -> int:
        return (self.weights + self.master + self.gradients + self.optimizer_states + self.activations
                + sum(b for _, b, _ in self.runtime))

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def breakdown(self) -> list[tuple[str, int, str]]:
        ckpt = "with" if self.gradient_checkpointing else "without"
        return [("weights", self.weights, f"{self.num_params:,} parameters"),
                ("master weights", self.master, "float32 copy of trainable weights" if self.master else ""),
                ("gradients", self.gradients, f"{self.num_trainable_params:,} trainable parameters"),
                ("optimizer states", self.optimizer_states, self.optimizer),
                ("activations", self.activations,
                 f"batch {self.batch_size} x {self.seq_len} tokens, {ckpt} gradient checkpointing")] + self.runtime

    def to_dict(self) -> dict:
        d = asdict(self)
        d["runtime"] = [{"label": a, "bytes": b, "note": c} for a, b, c in self.runtime]
        d.update(total=self.total, fits=self.fits,
                 breakdown=[{"label": a, "bytes": b, "note": c} for a, b, c in self.breakdown()])
        return d


def estimate_training(arch, *, name: str = "", mode: str = "full", dtype: str = "bfloat16",
                      optimizer: str = "adamw", master_weights: bool | None = None, batch_size: int = 1,
                      seq_len: int = 2048, gradient_checkpointing: bool = False, lora_rank: int = 16,
                      lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                      lora_dtype: str = "float32", attention: str = "sdpa", device: str = "cuda",
                      device_memory: int | None = None) -> TrainingEstimate:
    """Memory of one training step on one device. dtype is the dtype parameters and activations are held in;
    master_weights (default: on for 16-bit dtypes in full fine-tuning) adds a float32 copy of the trainable
    weights, and the optimizer states are then float32 too (else they take the parameters' dtype, as torch's)."""
    s = model_shape(arch)
    dtype = dtype_name(dtype)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidRequestError(f"training dtype {dtype!r} is not one of float32, bfloat16, float16")
    if mode not in MODES:
        raise InvalidRequestError(f"--mode {mode!r} is not one of inference, {', '.join(MODES)}")
    if optimizer not in OPTIMIZERS:
        raise InvalidRequestError(f"--optimizer {optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    if attention not in ("sdpa", "eager"):
        raise InvalidRequestError(f"attention {attention!r} is not one of sdpa, eager")
    if batch_size < 1 or seq_len < 1:
        raise InvalidRequestError(f"--batch-size and --seq-len must be >= 1, got {batch_size}, {seq_len}")
    a = dtype_bytes(dtype)
    base = param_tensors(s)
    notes = list(s.notes)
    n_params = sum(t.numel for t in base)
    if mode == "full":
        master = (a < 4) if master_weights is None else master_weights
        state_dtype = "float32" if master else dtype
        trainable = base
        weights = n_params * a
        grads = n_params * a
        master_bytes = n_params * 4 if master else 0
        lora = None
        lora_bytes = a
    else:
        master, state_dtype = False, dtype_name(lora_dtype)
        lora_bytes = dtype_bytes(state_dtype)
        trainable = lora_adapters(s, lora_targets, lora_rank)
        quant = "nf4" if mode == "qlora" else None
        weights = sum(tensor_bytes(t.shape, t.role, dtype, quant) for t in base)
        weights += sum(t.numel for t in trainable) * lora_bytes
        grads = sum(t.numel for t in trainable) * lora_bytes
        master_bytes = 0
        lora = {}
        for t in trainable:
            if t.name.endswith("lora_A.weight"):
                lora[t.name.split(".")[-3]] = (t.shape[1], t.shape[0])  # module -> (input width, rank)
        if mode == "qlora":
            notes.append("4-bit NF4 base weights with double quantization; one layer is dequantized at a time")
    states = sum(optimizer_state_bytes(t.numel, optimizer, state_dtype) for t in trainable)
    n_trainable = sum(t.numel for t in trainable)

    tokens = batch_size * seq_len
    per_layer = _layer_activations(s, tokens, batch_size, seq_len, a, attention, lora, lora_bytes)
    head = _head_activations(s, tokens, seq_len, a)
    if gradient_checkpointing:
        saved = s.num_layers * tokens * s.hidden_size * a + head
        peak = saved + per_layer
    else:
        saved = peak = s.num_layers * per_layer + head
    if mode == "qlora":  # the largest linear weight dequantized to the compute dtype for its matmul
        peak += max(t.numel for t in base if t.role in ("linear", "expert")) * a
    runtime = ([("CUDA context", CUDA_CONTEXT_BYTES, "outside torch's allocator"),
                ("workspace", CUDA_WORKSPACE_BYTES, "cuBLAS/cuBLASLt workspaces")] if device.startswith("cuda")
               else [("runtime", CPU_RUNTIME_BYTES, "Python and torch resident")])
    return TrainingEstimate(
        model=name, mode=mode, optimizer=optimizer, dtype=dtype, master_weights=master, batch_size=batch_size,
        seq_len=seq_len, gradient_checkpointing=gradient_checkpointing, num_params=n_params,
        num_trainable_params=n_trainable, weights=weights, master=master_bytes, gradients=grads,
        optimizer_states=states, activations=peak, activations_saved=saved, runtime=runtime, notes=notes,
        device_memory=device_memory)
