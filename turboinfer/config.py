"""Typed engine configuration. Every user-facing knob lives in one dataclass here; the CLI flags are generated
from these fields (see `add_cli_args` / `from_cli_args`), so the flag, the Python keyword and the
validation are one thing."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from typing import get_type_hints

from turboinfer.errors import InvalidRequestError


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
