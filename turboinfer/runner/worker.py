"""Everything torch-side that starting an engine needs: device and dtype, the loaded model, the tokenizer,
the KV pool size, and the model runner over that pool."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass, replace

import torch

from turboinfer import memory
from turboinfer.config import EngineConfig, default_num_threads, parse_memory
from turboinfer.engine.executor import EngineInfo
from turboinfer.errors import InvalidRequestError
from turboinfer.kv_cache.spec import bytes_per_seq, group_layers, max_len_that_fits, null_bytes, size_pools
from turboinfer.loader.model_loader import (check_quantization, init_dummy_weights, load_arch, load_tokenizer,
                                            load_weights_into, quantize_loaded, resolve_for_load)
from turboinfer.loader.resolve import ResolvedModel
from turboinfer.memory.shapes import dtype_name
from turboinfer.models.arch import ModelArch
from turboinfer.models.registry import build_model
from turboinfer.runner.model_runner import ModelRunner

logger = logging.getLogger("turboinfer")

CPU_KV_DEFAULT = 2 * 2**30  # default CPU KV budget; raise with --kv-cache-memory


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
    max_model_len: int
    device: str
    dtype: torch.dtype
    load_seconds: float
    num_packed_layers: int  # linear layers computing from quantized weights
    info: EngineInfo | None = None  # what the engine and its front doors are told (set once started)


def model_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the loaded weights occupy: parameters plus every tensor a quantized method or table keeps."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()

    for p in model.parameters():
        add(p)
    from turboinfer.layers.attention import Attention

    for mod in model.modules():
        if isinstance(mod, Attention):  # its tensors are the KV pool, counted apart
            continue
        for holder in (mod, getattr(mod, "quant_method", None)):
            if holder is None:
                continue
            for name, value in vars(holder).items():
                if not name.startswith("_"):
                    add(value)
    return total


def memory_report(worker: "Worker", cfg: EngineConfig) -> list[str]:
    """The estimator's breakdown filled in with what this engine really allocated (weights, KV pool)."""
    est = memory.estimate_inference(
        worker.arch, name=worker.resolved.display_name, dtype=dtype_name(worker.dtype),
        kv_cache_dtype=cfg.kv_cache_dtype, max_model_len=worker.max_model_len, max_num_seqs=cfg.max_num_seqs,
        max_num_batched_tokens=cfg.max_num_batched_tokens, enable_chunked_prefill=cfg.enable_chunked_prefill,
        block_size=cfg.block_size, device="cuda" if worker.device.startswith("cuda") else "cpu",
        kv_groups=list(worker.runner.kv_groups),
        weight_bytes=model_weight_bytes(worker.runner.model), weights_note="as loaded",
        cuda_graphs=worker.runner.decode_graphs is not None)
    return [f"  {label:<14} {nbytes / 2**20:10.1f} MiB  {note}" for label, nbytes, note in est.breakdown()]


def create_worker(cfg: EngineConfig) -> Worker:
    t0 = time.monotonic()
    dummy = cfg.load_format == "dummy"
    resolved = resolve_for_load(cfg.model, cfg.load_format)
    check_quantization(resolved, cfg.quantization, cfg.quant_group_size, cfg.awq, cfg.gptq)
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

    model = build_model(arch, device, dtype)
    if dummy:
        init_dummy_weights(model, cfg.seed)
        num_packed = 0
    else:
        num_packed = load_weights_into(model, resolved, torch.device(device), keep_packed=not cfg.dequantize_gguf)
    num_packed += len(quantize_loaded(model, resolved, torch.device(device), cfg.quantization, cfg.quant_group_size,
                                      cfg.awq, tokenizer, cfg.gptq))
    model.eval()
    release_load_memory()

    # The KV pool is sized after the weights are in memory, so on CUDA it takes what is really left.
    kv_name = dtype_name(dtype) if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype
    groups = group_layers([attn.kv_cache_spec(kv_name) for attn in model.attention_layers()])
    bs = cfg.block_size
    chunk = cfg.max_num_batched_tokens if cfg.enable_chunked_prefill else max(cfg.max_num_batched_tokens, max_len)
    if cfg.num_gpu_blocks_override is not None:
        groups = [replace(g, num_blocks=cfg.num_gpu_blocks_override + 1) for g in groups]  # + the null block
    else:
        if cfg.kv_cache_memory != "auto":
            budget = parse_memory(cfg.kv_cache_memory)
        elif device.startswith("cuda"):
            free, total = torch.cuda.mem_get_info()
            from turboinfer.memory.inference import activation_bytes

            activations = activation_bytes(arch, cfg.max_num_batched_tokens, cfg.max_num_seqs, max_len,
                                           dtype_name(dtype), cfg.kv_cache_dtype)
            budget = int(total * cfg.gpu_memory_utilization) - (total - free) - activations
        else:
            want = cfg.max_num_seqs * bytes_per_seq(groups, max_len, bs, chunk) + null_bytes(groups, bs)
            budget = min(want, CPU_KV_DEFAULT, available_ram() // 4)
        groups = size_pools(groups, budget, max_len, bs, chunk)
    if min(g.num_blocks for g in groups) < 2:
        raise InvalidRequestError("the KV-cache budget is smaller than one block; raise --kv-cache-memory")
    capacity = max_len_that_fits(groups, bs, chunk)
    if capacity is not None and cfg.max_model_len is not None and cfg.max_model_len > capacity:
        raise InvalidRequestError(f"--max-model-len {cfg.max_model_len} needs {cfg.max_model_len} KV tokens but the "
                                  f"cache holds {capacity}; raise --kv-cache-memory or lower --max-model-len")
    max_len = min(max_len, capacity or max_len)
    from turboinfer.layers.rotary import RotaryEmbedding

    for mod in model.modules():
        if isinstance(mod, RotaryEmbedding):
            mod.resize(max_len)  # positions 0 .. max_len - 1 are all a request can reach
    runner = ModelRunner(model, groups, bs, torch.device(device), dtype, seed=cfg.seed,
                         attention_backend=attention_backend, max_num_seqs=cfg.max_num_seqs, max_seq_len=max_len,
                         cuda_graphs=device.startswith("cuda") and not cfg.enforce_eager)
    release_load_memory()  # again: the full-length rotary tables and the runner's set-up temporaries are freed now
    worker = Worker(resolved, arch, tokenizer, runner, max_len, device, dtype, time.monotonic() - t0, num_packed)
    eos = frozenset(arch.eos_token_ids) | frozenset(tokenizer.eos_token_ids)
    worker.info = EngineInfo(
        model=resolved.display_name, path=resolved.path, model_format=resolved.kind, architecture=arch.architecture, dtype=dtype_name(dtype), device=device,
        max_model_len=max_len, vocab_size=arch.vocab_size, eos_token_ids=eos, block_size=bs,
        kv_cache_groups=tuple(groups), kv_cache_bytes=runner.kv_cache_bytes(),
        weight_bytes=model_weight_bytes(model), load_seconds=worker.load_seconds,
        num_packed_layers=num_packed, decode_path=decode_path(runner), memory_lines=tuple(memory_report(worker, cfg)))
    return worker


def decode_path(runner: ModelRunner) -> str:
    graphs = runner.decode_graphs
    if graphs is not None:
        return (f"CUDA graphs: {len(graphs.graphs)} decode batch sizes up to {graphs.max_batch} captured in "
                f"{graphs.capture_seconds:.1f}s (--enforce-eager to skip)")
    if runner.cpu_decoder is not None:
        return "CPU decode: one C call per step (docs/cpu_decode.md)"
    return ""
