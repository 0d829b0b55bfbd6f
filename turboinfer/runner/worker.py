"""Everything torch-side that starting an engine needs: device and dtype, the loaded model, the tokenizer,
the KV pool size, and the model runner over that pool."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass

import torch

from turboinfer.config import EngineConfig, ModelArch, default_num_threads, parse_memory
from turboinfer.errors import InvalidRequestError
from turboinfer.loader.model_loader import (check_quantization, init_dummy_weights, load_arch, load_tokenizer,
                                            load_weights_into, quantize_loaded, resolve_for_load)
from turboinfer.loader.resolve import ResolvedModel
from turboinfer.models.registry import build_model
from turboinfer.runner.model_runner import ModelRunner

logger = logging.getLogger("turboinfer")

CPU_KV_DEFAULT = 2 * 2**30  # default CPU KV budget; raise with --kv-cache-memory


KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}


def kv_bytes_per_token(arch: ModelArch, dtype: torch.dtype) -> int:
    # K and V, every layer, every KV head: [num_blocks, block_size, kv_heads, head_dim] per layer, plus one
    # float32 scale per token and head for the quantized caches
    per_head = arch.head_dim * torch.empty(0, dtype=dtype).element_size()
    if dtype in KV_DTYPES.values():
        per_head += 4
    return 2 * arch.num_layers * arch.num_kv_heads * per_head


def available_ram() -> int:
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def release_load_memory() -> None:
    """Loading makes large temporaries (dequantized tensors, GGUF mappings); hand them back to the OS so the
    resident size after startup is the model plus the KV pool."""
    import ctypes
    import gc

    from turboinfer.loader.gguf_file import release_readers

    release_readers()
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def resolve_attention_backend(backend: str, device: str) -> str:
    """auto -> triton on CUDA, torch on CPU. Triton kernels reach CPU tensors only through its interpreter
    (TRITON_INTERPRET=1, slow, meant for tests), so asking for them on CPU without it is an error up front."""
    on_cuda = device.startswith("cuda")
    if backend == "auto":
        if on_cuda and importlib.util.find_spec("triton") is None:
            logger.warning("triton is not installed: attention runs on the PyTorch kernels (slower on CUDA)")
            return "torch"
        return "triton" if on_cuda else "torch"
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        raise InvalidRequestError("--attention-backend triton needs the triton package (pip install triton)")
    interpreted = os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes")
    if backend == "triton" and not on_cuda and not interpreted:
        raise InvalidRequestError("--attention-backend triton needs a CUDA device (or TRITON_INTERPRET=1 to run "
                                  "the kernels in Triton's CPU interpreter)")
    return backend


@dataclass
class Worker:
    resolved: ResolvedModel
    arch: ModelArch
    tokenizer: object
    runner: ModelRunner
    num_blocks: int
    max_model_len: int
    device: str
    dtype: torch.dtype
    load_seconds: float
    num_packed_layers: int  # linear layers computing from quantized weights


def create_worker(cfg: EngineConfig) -> Worker:
    t0 = time.monotonic()
    dummy = cfg.load_format == "dummy"
    resolved = resolve_for_load(cfg.model, cfg.load_format)
    check_quantization(resolved, cfg.quantization, cfg.quant_group_size, cfg.awq)
    arch = load_arch(resolved)
    tokenizer = load_tokenizer(resolved, arch if dummy else None)
    device = cfg.resolved_device()
    dtype = cfg.resolved_dtype(device)
    attention_backend = resolve_attention_backend(cfg.attention_backend, device)
    if device == "cpu":
        torch.set_num_threads(cfg.num_threads or default_num_threads())
    if cfg.max_model_len is not None and cfg.max_model_len > arch.max_position_embeddings and not arch.rope_scaling:
        raise InvalidRequestError(f"--max-model-len {cfg.max_model_len} exceeds the model's context length "
                                  f"{arch.max_position_embeddings}")
    max_len = cfg.max_model_len or arch.max_position_embeddings

    kv_dtype = KV_DTYPES.get(cfg.kv_cache_dtype, dtype)
    per_token = kv_bytes_per_token(arch, kv_dtype)
    if cfg.num_gpu_blocks_override is not None:
        num_blocks = cfg.num_gpu_blocks_override + 1
    else:
        if cfg.kv_cache_memory != "auto":
            budget = parse_memory(cfg.kv_cache_memory)
        elif device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - 2 * arch.vocab_size * 4 * 1024
        else:
            want = cfg.max_num_seqs * max_len * per_token
            budget = min(want, CPU_KV_DEFAULT, available_ram() // 4)
        num_blocks = budget // (per_token * cfg.block_size) + 1  # +1: the null block
    capacity = (num_blocks - 1) * cfg.block_size
    if num_blocks < 2:
        raise InvalidRequestError("the KV-cache budget is smaller than one block; raise --kv-cache-memory")
    if cfg.max_model_len is not None and cfg.max_model_len > capacity:
        raise InvalidRequestError(f"--max-model-len {cfg.max_model_len} needs {cfg.max_model_len} KV tokens but the "
                                  f"cache holds {capacity}; raise --kv-cache-memory or lower --max-model-len")
    max_len = min(max_len, capacity)

    with torch.device(device):
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            model = build_model(arch)
        finally:
            torch.set_default_dtype(prev)
    if dummy:
        init_dummy_weights(model, cfg.seed)
        num_packed = 0
    else:
        num_packed = load_weights_into(model, resolved, torch.device(device), keep_packed=not cfg.dequantize_gguf)
    num_packed += len(quantize_loaded(model, resolved, torch.device(device), cfg.quantization, cfg.quant_group_size,
                                      cfg.awq, tokenizer))
    model.eval()
    release_load_memory()
    runner = ModelRunner(model, num_blocks, cfg.block_size, torch.device(device), dtype, kv_dtype=kv_dtype,
                         seed=cfg.seed, attention_backend=attention_backend)
    return Worker(resolved, arch, tokenizer, runner, num_blocks, max_len, device, dtype, time.monotonic() - t0,
                  num_packed)
