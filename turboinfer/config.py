"""Typed configuration. Every user-facing knob lives in one dataclass here; the CLI flags are generated
from these fields (see `add_cli_args` / `from_cli_args`), so the flag, the Python keyword and the
validation are one thing."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import Any, get_type_hints

from turboinfer.errors import InvalidRequestError, UnsupportedModelError

# Architectures served by models/llama.py, and what each implies beyond the config numbers.
LLAMA_FAMILY = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
# Served by models/gemma3.py (text-only Gemma 3: 270M and 1B; the larger ones are vision-language models).
GEMMA3_FAMILY = {"Gemma3ForCausalLM": "gemma3_text"}
SUPPORTED_ARCHITECTURES = {**LLAMA_FAMILY, **GEMMA3_FAMILY}


@dataclass(frozen=True)
class ModelArch:
    """The numbers a model file needs, normalised from an HF config.json (any transformers version)
    or from GGUF metadata (loader/gguf_file.py produces an HF-style dict first)."""

    architecture: str  # HF class name, e.g. "LlamaForCausalLM"; selects the model file
    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3"
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
    attention_bias: bool  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool  # per-head RMSNorm on q and k before RoPE (Qwen3)
    sliding_window: int | None  # Mistral/Qwen window; None when every layer attends to the full context
    hidden_act: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # dtype the checkpoint was saved in ("float32", "bfloat16", ...)
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

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> "ModelArch":
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(
            cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHITECTURES:
            known = ", ".join(sorted(SUPPORTED_ARCHITECTURES))
            raise UnsupportedModelError(
                f"architecture {arch or cfg.get('model_type') or '<none>'!r} is not supported; supported: {known}"
            )
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in cfg]
        if missing:
            raise UnsupportedModelError(f"model config lacks required field(s): {', '.join(missing)}")
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        if arch in GEMMA3_FAMILY:
            return cls._gemma3(cfg, arch, num_heads, hidden)
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
        model_type = LLAMA_FAMILY[arch]
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", model_type == "mistral") else None
        return cls(
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
            attention_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
            qk_norm=model_type == "qwen3",
            sliding_window=int(window) if window else None,
            hidden_act=cfg.get("hidden_act", "silu"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg),
            torch_dtype=_saved_dtype(cfg),
        )

    @classmethod
    def _gemma3(cls, cfg: dict[str, Any], arch: str, num_heads: int, hidden: int) -> "ModelArch":
        """Gemma 3 text: five sliding-window layers (local RoPE base 10,000) to one global layer, by default."""
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
        types = cfg.get("layer_types")
        if not types:
            pattern = int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6)
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        if len(types) != num_layers or set(types) - {"sliding_attention", "full_attention"}:
            raise UnsupportedModelError(f"Gemma 3 layer_types {types!r} do not fit {num_layers} layers")
        if cfg.get("attn_logit_softcapping") is not None:
            raise UnsupportedModelError(f"Gemma 3 attn_logit_softcapping={cfg['attn_logit_softcapping']!r} is not "
                                        "supported")
        window = cfg.get("sliding_window")
        cap = cfg.get("final_logit_softcapping")
        return cls(
            architecture=arch,
            model_type="gemma3_text",
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
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
            attention_bias=bool(cfg.get("attention_bias", False)),
            qk_norm=True,
            sliding_window=int(window) if window else None,
            hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_eos_ids(cfg),
            torch_dtype=_saved_dtype(cfg),
            layer_types=tuple(types) if window else None,
            rope_local_theta=float(local.get("rope_theta", 10_000.0)),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or int(cfg.get("head_dim") or 256)),
            final_logit_softcapping=float(cap) if cap else None,
        )


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def _saved_dtype(cfg: dict[str, Any]) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")


def _flag(help: str, **kw) -> dict:
    """Field metadata: the help text of the generated CLI flag (and extra argparse keywords)."""
    return {"help": help, **kw}


@dataclass
class EngineConfig:
    """Everything the engine needs to start. `LLM(**kwargs)` and the CLI both build one of these."""

    model: str = field(default="smollm2-135m-instruct", metadata=_flag(
        "model: alias, local HF directory, .gguf file or hub id"))
    dtype: str = field(default="auto", metadata=_flag(
        "weight/activation dtype: auto|float32|bfloat16|float16 (auto: bfloat16 on CUDA and on CPUs with native "
        "bf16 (AVX512-BF16/AMX), else float32)"))
    load_format: str = field(default="auto", metadata=_flag(
        "auto: read the checkpoint's weights; dummy: random weights from the config alone (an HF directory, a "
        "config.json or a GGUF's metadata), to benchmark a model without downloading it"))
    dequantize_gguf: bool = field(default=False, metadata=_flag(
        "dequantize GGUF 4-bit weights to --dtype at load instead of computing from the packed blocks"))
    quantization: str = field(default="none", metadata=_flag(
        "quantize a float checkpoint's linear layers at load (embeddings and lm_head stay float): none | int8 "
        "(per output channel) | int4 (per group of --quant-group-size input features)"))
    quant_group_size: int = field(default=128, metadata=_flag(
        "int4 group size: 32|64|128|256 (a layer whose width it does not divide uses the largest that does)"))
    awq: bool = field(default=False, metadata=_flag(
        "with --quantization int4: activation-aware per-channel scales searched on a built-in calibration text "
        "(with --gptq: AWQ's scales, then GPTQ's rounding)"))
    gptq: bool = field(default=False, metadata=_flag(
        "with --quantization int4: GPTQ (error-compensating, layer by layer) on a built-in calibration text"))
    device: str = field(default="auto", metadata=_flag("device: auto|cpu|cuda"))
    max_model_len: int | None = field(default=None, metadata=_flag(
        "longest prompt+completion in tokens (default: the model's context length, capped by KV memory)"))
    max_num_seqs: int = field(default=64, metadata=_flag("most sequences decoded in one step"))
    max_num_batched_tokens: int = field(default=512, metadata=_flag(
        "token budget of one step; long prompts are prefilled in chunks of at most this"))
    enable_chunked_prefill: bool = field(default=True, metadata=_flag(
        "split long prompts across steps so decodes keep flowing"))
    block_size: int = field(default=16, metadata=_flag("tokens per KV-cache block"))
    kv_cache_dtype: str = field(default="auto", metadata=_flag(
        "KV-cache storage: auto (the compute dtype) | int8 | fp8 (e4m3); int8/fp8 keep one float32 scale per "
        "token and KV head and roughly double the tokens that fit"))
    kv_cache_memory: str = field(default="auto", metadata=_flag(
        "KV-cache budget, e.g. 2GiB or 512MiB (auto: enough for max_num_seqs full contexts, at most 25%% "
        "of free RAM on CPU / the rest of --gpu-memory-utilization on CUDA)"))
    num_gpu_blocks_override: int | None = field(default=None, metadata=_flag(
        "force the number of KV blocks (testing preemption)"))
    gpu_memory_utilization: float = field(default=0.9, metadata=_flag("fraction of GPU memory to use"))
    enforce_eager: bool = field(default=False, metadata=_flag(
        "on CUDA, run decode steps eagerly instead of replaying CUDA graphs captured at start-up"))
    enable_prefix_caching: bool = field(default=True, metadata=_flag("reuse KV blocks of shared prompt prefixes"))
    num_threads: int | None = field(default=None, metadata=_flag("CPU threads for torch (default: all cores)"))
    seed: int = field(default=0, metadata=_flag("seed for requests that carry none"))
    attention_backend: str = field(default="auto", metadata=_flag(
        "attention kernels: auto|torch|triton (auto: triton on CUDA, torch on CPU; the environment variable "
        "TURBOINFER_ATTENTION_BACKEND replaces auto)"))
    trust_remote_code: bool = field(default=False, metadata=_flag("accepted for vLLM compatibility; unused"))

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"--dtype {self.dtype!r} is not one of auto, float32, bfloat16, float16")
        if self.load_format not in ("auto", "dummy"):
            raise InvalidRequestError(f"--load-format {self.load_format!r} is not one of auto, dummy")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise InvalidRequestError(f"--device {self.device!r} is not one of auto, cpu, cuda")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.quantization not in ("none", "int8", "int4"):
            raise InvalidRequestError(f"--quantization {self.quantization!r} is not one of none, int8, int4")
        if self.quant_group_size not in (32, 64, 128, 256):
            raise InvalidRequestError(f"--quant-group-size must be 32, 64, 128 or 256, got {self.quant_group_size}")
        if self.awq and self.quantization != "int4":
            raise InvalidRequestError("--awq needs --quantization int4")
        if self.gptq and self.quantization != "int4":
            raise InvalidRequestError("--gptq needs --quantization int4")
        if self.kv_cache_dtype not in ("auto", "int8", "fp8"):
            raise InvalidRequestError(f"--kv-cache-dtype {self.kv_cache_dtype!r} is not one of auto, int8, fp8")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise InvalidRequestError(f"--max-model-len must be >= 1, got {self.max_model_len}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise InvalidRequestError("--gpu-memory-utilization must be in (0, 1]")
        if self.attention_backend == "auto":
            self.attention_backend = os.environ.get("TURBOINFER_ATTENTION_BACKEND", "auto")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidRequestError(f"attention backend {self.attention_backend!r} (--attention-backend or "
                                      "TURBOINFER_ATTENTION_BACKEND) is not one of auto, torch, triton")

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device

    def resolved_dtype(self, device: str):
        import torch

        if self.dtype == "auto":
            return torch.bfloat16 if device.startswith("cuda") or cpu_has_bf16() else torch.float32
        return getattr(torch, self.dtype)


def cpu_has_bf16() -> bool:
    """bfloat16 matmuls are fast (2-4x float32) only where the CPU executes them natively."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def parse_memory(text: str) -> int:
    """'2GiB' / '512MiB' / '1.5GB' / '1000000' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9,
             "tb": 10**12, "b": 1, "": 1}
    t = text.strip().lower()
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    if unit not in units or not num:
        raise InvalidRequestError(f"cannot read memory size {text!r}; write it like 2GiB or 512MiB")
    return int(float(num) * units[unit])


def add_cli_args(parser: argparse.ArgumentParser, cls=EngineConfig, skip: tuple[str, ...] = ()) -> None:
    """One flag per dataclass field: --max-num-seqs for max_num_seqs, booleans as --x / --no-x."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        default = f.default if f.default is not dataclasses.MISSING else None
        typ = hints[f.name]
        if typ is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        base = {int: int, float: float, str: str}.get(typ)
        if base is None:  # Optional[int] etc.
            args = getattr(typ, "__args__", ())
            base = next((a for a in args if a in (int, float, str)), str)
        parser.add_argument(flag, type=base, default=default, help=help_text + f" (default: {default})")


def from_cli_args(args: argparse.Namespace, cls=EngineConfig, **overrides):
    kwargs = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
    kwargs.update(overrides)
    return cls(**kwargs)


def default_num_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
