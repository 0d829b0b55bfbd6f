"""Inference memory: weights + KV cache + the activation peak of one step + runtime overheads.

Activations (one engine step of T tokens, no autograd: a layer's temporaries die before the next layer runs;
b = compute dtype bytes, per rank q = heads*head_dim/tp, kv = kv_heads_per_rank*head_dim, i = intermediate/tp):
    stream     2*T*h*b                         hidden state and residual, alive across layers
    attention  T*b*(h + (q+2kv) + (q+kv) + q + h) + kernel scratch
               (normed input, qkv, rotated q|k, attention output, o_proj output)
    mlp        T*b*(h + 2i + i + i)            normed input, gate|up, act(gate), act(gate)*up
    logits     R*V*(b + 48)                    R = sequences sampled this step: the logits, their float32 copy
                                                and the sampler's copies (float32 rows, sort values, int64 order)
    peak = stream + max(attention, mlp, logits)
Kernel scratch: the PyTorch attention (CPU) gathers a sequence's K/V from the paged cache as float32 and
casts them to the compute dtype (prefill: one sequence of max_model_len; decode: the decoding sequences a
group at a time, each group padded to its longest and at most 16,384 K/V rows unless one sequence alone is
longer, with float32 scores and probabilities); the Triton kernels (CUDA) read the cache in place and keep only
split-KV partial results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from turboinfer.errors import InvalidRequestError
from turboinfer.kv_cache.spec import pool_bytes
from turboinfer.memory.kv import kv_bytes_for_sequences, kv_cache_bytes, kv_cache_bytes_per_token, kv_element
from turboinfer.memory.params import check_tp, kv_heads_per_rank, weight_bytes_from_hf
from turboinfer.memory.shapes import dtype_bytes, dtype_name, model_shape

MiB = 2**20
# Runtime overheads, stated rather than measured at estimate time.
CUDA_CONTEXT_BYTES = 512 * MiB  # CUDA context + loaded kernel images; outside torch's allocator (nvidia-smi sees it)
CUDA_WORKSPACE_BYTES = 64 * MiB  # cuBLAS/cuBLASLt workspaces (torch allocates them per stream and handle)
CUDA_GRAPH_BASE_BYTES = 16 * MiB  # static input/output buffers of the captured decode graphs, all batch buckets
CPU_RUNTIME_BYTES = 280 * MiB  # resident Python + torch + turboinfer + tokenizer before any weight is loaded
# CPU resident memory of the step temporaries: glibc keeps freed chunks, so the resident peak is about twice the
# live peak, plus thread pools and kernel caches created by the first step (measured: docs/memory.md).
CPU_WARMUP_BYTES = 32 * MiB
SAMPLER_BYTES_PER_LOGIT = 48  # per sampled row and vocabulary entry, counted from runner/sampler.py
DECODE_SPLITS = 16  # most split-KV partitions of the Triton decode kernel
DECODE_GATHER_TOKENS = 16384  # K/V rows one PyTorch decode gather holds (kernels/torch_ref/attention.py)


def resolve_compute_dtype(dtype: str | None, device: str) -> str:
    """The engine's rule: 'auto' is bfloat16 on CUDA and on CPUs with native bf16, else float32."""
    name = dtype_name(dtype or "auto")
    if name == "auto":
        if device.startswith("cuda"):
            return "bfloat16"
        from turboinfer.config import cpu_has_bf16

        return "bfloat16" if cpu_has_bf16() else "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise InvalidRequestError(f"--dtype {name!r} is not one of auto, float32, bfloat16, float16")
    return name


def activation_bytes(arch, num_tokens: int, num_seqs: int, max_model_len: int, dtype: str = "bfloat16",
                     kv_cache_dtype: str = "auto", tp_size: int = 1, attention_backend: str = "triton",
                     include_logits: bool = True, cuda_graph: bool = False) -> int:
    """Peak live bytes of one engine step of `num_tokens` tokens (see the module docstring). cuda_graph: a
    captured decode step, whose PyTorch attention gathers the whole batch padded to max_model_len at once."""
    s = model_shape(arch)
    b = dtype_bytes(dtype)
    kv_elem, scaled = kv_element(kv_cache_dtype, dtype)
    t, h, tp = num_tokens, s.hidden_size, tp_size
    rows = min(num_seqs, num_tokens)
    heads = s.num_heads // tp
    if s.is_mla:  # q, the latent + rope key, per-head k|v expanded from it, attention output
        q = heads * s.head_dim
        cache_width = s.kv_lora_rank + s.qk_rope_head_dim
        width = 2 * h + q + cache_width + heads * (s.head_dim + s.v_head_dim) + heads * s.v_head_dim
    else:  # qkv, rotated q|k, attention output
        q, kv = heads * s.head_dim, kv_heads_per_rank(s, tp) * s.head_dim
        cache_width = 2 * kv  # K and V
        width = 2 * h + 3 * q + 3 * kv
    if attention_backend == "torch":
        padded = -(-max_model_len // 16) * 16
        # K/V gathered as float32; one of them also as raw codes (and scaled codes) while converting
        gathered = 4 * cache_width + (cache_width // 2 * (kv_elem + (4 if scaled else 0)) if kv_elem != 4 else 0)
        prefill = padded * (gathered + (cache_width * b if b != 4 else 0)) + t * padded * (1 + b)  # + mask
        # decodes are gathered a group at a time: at most DECODE_GATHER_TOKENS rows, or one padded sequence
        decode_rows = rows * padded if cuda_graph else min(rows * padded, max(DECODE_GATHER_TOKENS, padded))
        decode = decode_rows * (gathered + 2 * heads * 4 + 4)  # + float32 scores, probabilities, mask
        scratch = max(prefill, decode)
    else:
        scratch = rows * heads * DECODE_SPLITS * (s.v_head_dim + 2) * 4
    attention = t * b * width + scratch
    if s.num_experts and any(s.moe_layers):
        moe_width = s.num_experts_per_tok * s.moe_intermediate_size + s.shared_expert_intermediate_size
        mlp = t * b * (h + 4 * -(-moe_width // tp)) + t * s.num_experts * 4  # + float32 router logits
        if not all(s.moe_layers):
            mlp = max(mlp, t * b * (h + 4 * -(-s.intermediate_size // tp)))
    else:
        mlp = t * b * (h + 4 * -(-s.intermediate_size // tp))
    logits = rows * s.vocab_size * (b + SAMPLER_BYTES_PER_LOGIT) if include_logits else 0
    return 2 * t * h * b + max(attention, mlp, logits)


@dataclass
class InferenceEstimate:
    """Bytes per device for serving one model with given settings. `breakdown()` lists them with notes."""

    model: str
    device: str  # "cuda" | "cpu": decides the runtime overheads and the attention kernels assumed
    dtype: str  # compute dtype of weights and activations
    kv_cache_dtype: str
    tp_size: int
    max_model_len: int
    max_num_seqs: int
    num_batched_tokens: int  # tokens of the largest step (prefill chunk) the activation figure is for
    block_size: int
    num_kv_blocks: int  # blocks of the KV pool, the null block included
    weights: int
    kv_cache: int
    kv_bytes_per_token: int  # all layers, one rank
    activations: int
    runtime: list[tuple[str, int, str]]  # (label, bytes, note) of the stated constants
    weights_note: str = ""
    kv_note: str = ""
    notes: list[str] = field(default_factory=list)
    device_memory: int | None = None  # memory available per device, when the question is "does it fit"

    @property
    def runtime_bytes(self) -> int:
        return sum(b for _, b, _ in self.runtime)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.runtime_bytes

    @property
    def allocator_bytes(self) -> int:
        """What torch.cuda.max_memory_allocated should report on CUDA (everything but the CUDA context)."""
        return self.total - sum(b for label, b, _ in self.runtime if label == "CUDA context")

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def breakdown(self) -> list[tuple[str, int, str]]:
        rows = [("weights", self.weights, self.weights_note),
                ("KV cache", self.kv_cache, self.kv_note),
                ("activations", self.activations, f"peak of one step of {self.num_batched_tokens} tokens")]
        return rows + list(self.runtime)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["runtime"] = [{"label": a, "bytes": b, "note": c} for a, b, c in self.runtime]
        d.update(total=self.total, allocator_bytes=self.allocator_bytes, fits=self.fits,
                 breakdown=[{"label": a, "bytes": b, "note": c} for a, b, c in self.breakdown()])
        return d


def runtime_overheads(device: str, cuda_graphs: bool, graph_activations: int,
                      activations: int) -> list[tuple[str, int, str]]:
    if not device.startswith("cuda"):
        return [("runtime", CPU_RUNTIME_BYTES, "Python, torch, turboinfer and tokenizer resident (measured constant)"),
                ("allocator slack", CPU_WARMUP_BYTES + activations,
                 "freed step temporaries stay resident (glibc) + thread pools and kernel caches (measured)")]
    out = [("CUDA context", CUDA_CONTEXT_BYTES, "driver context and kernel images, outside torch's allocator"),
           ("workspace", CUDA_WORKSPACE_BYTES, "cuBLAS/cuBLASLt workspaces")]
    if cuda_graphs:
        out.append(("CUDA graphs", CUDA_GRAPH_BASE_BYTES + graph_activations,
                    "static buffers + private pool of the largest captured decode batch"))
    return out


def estimate_inference(arch, *, name: str = "", dtype: str = "auto", quantization: str | None = None,
                       group_size: int = 128, weight_bytes: int | None = None, weights_note: str = "",
                       kv_cache_dtype: str = "auto", max_model_len: int | None = None, max_num_seqs: int = 1,
                       max_num_batched_tokens: int = 512, enable_chunked_prefill: bool = True, block_size: int = 16,
                       tp_size: int = 1, device: str = "cuda", attention_backend: str = "auto",
                       num_kv_blocks: int | None = None, kv_groups: list | None = None, cuda_graphs: bool = True,
                       device_memory: int | None = None) -> InferenceEstimate:
    """Memory per device to serve `arch` (ModelShape, ModelArch or HF config dict).

    weight_bytes overrides the weights computed from the config (e.g. GGUFWeights.packed_bytes); KV is sized for
    max_num_seqs sequences of max_model_len tokens (whole blocks each, sliding-window layers at their window, plus
    the null blocks), or for exactly num_kv_blocks blocks of every layer, or for the engine's sized pools
    (kv_groups: kv_cache/spec.py KVCacheGroups with num_blocks set)."""
    s = model_shape(arch)
    check_tp(s, tp_size)
    device = "cuda" if device.startswith("cuda") else "cpu"
    compute = resolve_compute_dtype(dtype, device)
    max_len = s.max_position_embeddings if max_model_len is None else max_model_len
    for flag, v in (("max-model-len", max_len), ("max-num-seqs", max_num_seqs), ("block-size", block_size),
                    ("max-num-batched-tokens", max_num_batched_tokens)):
        if v < 1:
            raise InvalidRequestError(f"--{flag} must be >= 1, got {v}")
    notes = list(s.notes)
    if max_len > s.max_position_embeddings:
        notes.append(f"max_model_len {max_len} exceeds the model's context length {s.max_position_embeddings}")
    backend = attention_backend if attention_backend != "auto" else ("triton" if device == "cuda" else "torch")

    if weight_bytes is None:
        weight_bytes = weight_bytes_from_hf(s, compute, quantization, group_size, tp_size)
        detail = f", {quantization} linear layers" + (f" (group {group_size})" if quantization == "int4" else "")
        weights_note = weights_note or compute + (detail if quantization else "")
    per_token = kv_cache_bytes_per_token(s, kv_cache_dtype, compute, tp_size)
    kv_name = compute if dtype_name(kv_cache_dtype) == "auto" else dtype_name(kv_cache_dtype)
    chunk = max_num_batched_tokens if enable_chunked_prefill else max(max_num_batched_tokens, max_len)
    windowed = any(w is not None for w in s.layer_windows)
    if kv_groups is not None:
        kv = pool_bytes(kv_groups, block_size)
        num_kv_blocks = max(g.num_blocks for g in kv_groups)
        kv_note = " + ".join(f"{g.num_blocks} blocks x {len(g.layer_ids)} layers" +
                             (f" (window {g.spec.sliding_window})" if g.spec.sliding_window else "")
                             for g in kv_groups) + f" x {block_size} tokens (null blocks included), {kv_name}"
    elif num_kv_blocks is not None:
        kv = kv_cache_bytes(s, num_kv_blocks, block_size, kv_cache_dtype, compute, tp_size)
        kv_note = f"{num_kv_blocks} blocks x {block_size} tokens (null block included), {kv_name}"
    else:
        kv = kv_bytes_for_sequences(s, max_len, max_num_seqs, block_size, kv_cache_dtype, compute, tp_size, chunk)
        num_kv_blocks = kv // (per_token * block_size)
        kv_note = f"{max_num_seqs} x {max_len} tokens, {kv_name}, {per_token} B/token"
        if windowed:
            kv_note += "; sliding-window layers hold only their window (blocks that leave it are freed)"
    if kv_name in ("int8", "fp8"):
        kv_note += " + float32 scale per token and KV head"
    if device == "cpu":
        kv_note += "; resident as blocks are first written"

    tokens = max(min(chunk, max_num_seqs * max_len), min(max_num_seqs, chunk))
    act = activation_bytes(s, tokens, max_num_seqs, max_len, compute, kv_cache_dtype, tp_size, backend)
    graph_act = activation_bytes(s, max_num_seqs, max_num_seqs, max_len, compute, kv_cache_dtype, tp_size, backend,
                                 include_logits=False, cuda_graph=True)
    return InferenceEstimate(
        model=name, device=device, dtype=compute, kv_cache_dtype=kv_name, tp_size=tp_size, max_model_len=max_len,
        max_num_seqs=max_num_seqs, num_batched_tokens=tokens, block_size=block_size, num_kv_blocks=num_kv_blocks,
        weights=weight_bytes, kv_cache=kv, kv_bytes_per_token=per_token, activations=act,
        runtime=runtime_overheads(device, cuda_graphs, graph_act, act), weights_note=weights_note, kv_note=kv_note,
        notes=notes, device_memory=device_memory)


def _fixed_weights(arch, kw: dict) -> dict:
    """Compute weights once for the searches below (they call estimate_inference many times)."""
    if kw.get("weight_bytes") is None:
        s = model_shape(arch)
        compute = resolve_compute_dtype(kw.get("dtype", "auto"), kw.get("device", "cuda"))
        kw = {**kw, "weight_bytes": weight_bytes_from_hf(s, compute, kw.get("quantization"),
                                                         kw.get("group_size", 128), kw.get("tp_size", 1))}
    return kw


def _largest(fits, hi: int) -> int:
    """Largest n in [1, hi] with fits(n), for a monotone predicate; 0 when fits(1) is false."""
    if not fits(1):
        return 0
    lo = 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def _nothing_fits(arch, device_memory: int, kw: dict) -> InvalidRequestError:
    e = estimate_inference(arch, **{**kw, "max_model_len": 1, "max_num_seqs": 1})
    return InvalidRequestError(
        f"nothing fits in {device_memory / 2**30:.2f} GiB: weights {e.weights / 2**30:.2f} GiB + runtime "
        f"{e.runtime_bytes / 2**30:.2f} GiB + activations {e.activations / 2**30:.2f} GiB leave no room for "
        "one KV block")


def max_context_len(arch, device_memory: int, max_num_seqs: int = 1, **kw) -> int:
    """Longest max_model_len whose estimate (max_num_seqs sequences of it) fits in device_memory.
    Not capped by the model's own context length; compare with ModelShape.max_position_embeddings."""
    s = model_shape(arch)
    kw = _fixed_weights(s, kw)
    return _largest_fitting(s, kw, device_memory, max_num_seqs,
                            lambda n: {"max_model_len": n, "max_num_seqs": max_num_seqs})


def max_num_seqs(arch, device_memory: int, max_model_len: int | None = None, **kw) -> int:
    """Most concurrent sequences of max_model_len tokens (default: the model's context) that fit."""
    s = model_shape(arch)
    kw = _fixed_weights(s, kw)
    length = s.max_position_embeddings if max_model_len is None else max_model_len
    return _largest_fitting(s, kw, device_memory, length, lambda n: {"max_model_len": length, "max_num_seqs": n})


def _largest_fitting(s, kw: dict, device_memory: int, tokens_per_unit: int, settings) -> int:
    """Largest n whose estimate with `settings(n)` fits; the KV bytes of n units bound the search from above."""
    per_unit = kv_cache_bytes_per_token(s, kw.get("kv_cache_dtype", "auto"),
                                        resolve_compute_dtype(kw.get("dtype", "auto"), kw.get("device", "cuda")),
                                        kw.get("tp_size", 1)) * tokens_per_unit
    hi = max(1, device_memory // max(1, per_unit) + 1)
    n = _largest(lambda n: estimate_inference(s, **{**kw, **settings(n)}).total <= device_memory, hi)
    if n == 0:
        raise _nothing_fits(s, device_memory, kw)
    return n


def kv_tokens_that_fit(arch, device_memory: int, **kw) -> int:
    """KV tokens (whole blocks, null block excluded) that fit beside the weights, the activation peak and the
    runtime overheads: the pool the engine would allocate in device_memory."""
    s = model_shape(arch)
    kw = _fixed_weights(s, kw)
    base = estimate_inference(s, **{**kw, "num_kv_blocks": 0})
    block_size = kw.get("block_size", 16)
    num_blocks = (device_memory - base.total) // (base.kv_bytes_per_token * block_size)
    if num_blocks < 2:
        raise _nothing_fits(s, device_memory, kw)
    return (num_blocks - 1) * block_size
