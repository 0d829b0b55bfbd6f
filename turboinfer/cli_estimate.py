"""`turboinfer estimate MODEL`: memory to serve or fine-tune a model, from its config and tensor shapes only.

MODEL is an HF model directory, a lone config.json, a GGUF file (only its header is read), an alias, or a hub
id (only config.json is downloaded). With --device-memory it also answers the inverse questions: the longest
context, the most concurrent sequences and the KV tokens that fit.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import struct
import sys
from dataclasses import dataclass

from turboinfer.errors import InvalidRequestError, ModelLoadError, ModelNotFoundError

MODES = ("inference", "full", "lora", "qlora")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # org/name


def add_parser(subparsers) -> argparse.ArgumentParser:
    help_text = "estimate the memory to serve or fine-tune a model (reads only its config / GGUF header)"
    p = subparsers.add_parser("estimate", help=help_text, description=help_text)
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, config.json, .gguf file, alias or hub id (default: the default model)")
    p.add_argument("--mode", choices=MODES, default="inference", help="inference or fine-tuning (default: inference)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="device to estimate for; decides runtime overheads and attention kernels (default: cuda)")
    p.add_argument("--device-memory", default=None,
                   help="memory per device, e.g. 80GiB: say whether it fits and answer the inverse questions")
    p.add_argument("--dtype", default="auto", help="compute dtype: auto|float32|bfloat16|float16 (default: auto, "
                   "bfloat16 on CUDA; training default: bfloat16)")
    p.add_argument("--quantization", choices=("none", "int8", "int4"), default="none",
                   help="weight quantization of an HF model's linear layers (GGUF files are counted as stored)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size (default: 128)")
    p.add_argument("--dequantize-gguf", action="store_true", help="count GGUF weights dequantized to --dtype")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto|float32|bfloat16|float16|int8|fp8 (default: auto)")
    p.add_argument("--max-model-len", type=int, default=None, help="context per sequence (default: the model's)")
    p.add_argument("--max-num-seqs", type=int, default=1, help="concurrent sequences (default: 1)")
    p.add_argument("--max-num-batched-tokens", type=int, default=512, help="prefill chunk size (default: 512)")
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block (default: 16)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="devices to shard over (default: 1)")
    p.add_argument("--batch-size", type=int, default=1, help="training: sequences per step (default: 1)")
    p.add_argument("--seq-len", type=int, default=None, help="training: tokens per sequence (default: "
                   "min(2048, the model's context))")
    p.add_argument("--optimizer", choices=("adamw", "adamw8bit", "sgd"), default="adamw",
                   help="training optimizer (default: adamw)")
    p.add_argument("--master-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="training: keep float32 master weights (default: on for 16-bit full fine-tuning)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="training: recompute layer activations")
    p.add_argument("--lora-rank", type=int, default=16, help="LoRA/QLoRA rank (default: 16)")
    p.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
                   help="comma-separated module names, or all-linear")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="training: attention implementation (eager stores the seq x seq probabilities)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


@dataclass
class LoadedSpec:
    """What the estimate is computed from: the model's numbers and, for GGUF, its exact tensor bytes."""

    name: str
    shape: object  # memory.ModelShape
    gguf: object | None = None  # memory.gguf_header.GGUFHeader
    checkpoint_bytes: int | None = None  # bytes of the safetensors tensors, when the directory has them


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ModelLoadError(f"{path} does not hold a JSON object")
    return cfg


def safetensors_bytes(model_dir: str) -> int | None:
    """Sum of tensor bytes in the directory's .safetensors files, read from their headers."""
    total, found = 0, False
    for name in sorted(os.listdir(model_dir)):
        if not name.endswith(".safetensors"):
            continue
        found = True
        with open(os.path.join(model_dir, name), "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        total += sum(v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__")
    return total if found else None


def load_spec(model: str | None) -> LoadedSpec:
    from turboinfer.memory.gguf_header import read_gguf_header, shape_from_gguf
    from turboinfer.memory.shapes import shape_from_hf_config

    name = model or "smollm2-135m-instruct"
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            header = read_gguf_header(path)
            return LoadedSpec(os.path.basename(path).removesuffix(".gguf"), shape_from_gguf(header), header)
        if path.endswith(".json"):
            parent = os.path.basename(os.path.dirname(os.path.abspath(path)))
            return LoadedSpec(parent or path, shape_from_hf_config(_read_json(path)))
        raise ModelLoadError(f"{name} is neither a GGUF file nor a config.json")
    if os.path.isdir(path):
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise ModelNotFoundError(f"directory {name} has no config.json")
        return LoadedSpec(os.path.basename(os.path.abspath(path)), shape_from_hf_config(_read_json(cfg_path)),
                          checkpoint_bytes=safetensors_bytes(path))
    from turboinfer.loader.resolve import ALIASES, resolve_model

    if name.lower() in ALIASES:
        resolved = resolve_model(name)
        header = read_gguf_header(resolved.path)
        return LoadedSpec(resolved.display_name, shape_from_gguf(header), header)
    if name.startswith((".", "/", "~")) or name.endswith((".gguf", ".json")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name} does not exist")
    if _HUB_ID.fullmatch(name):
        try:
            from huggingface_hub import hf_hub_download

            cfg_path = hf_hub_download(name, "config.json")
        except Exception as e:  # offline, unknown or gated repo: one line for the user
            first = (str(e).strip().splitlines() or [""])[0]
            raise ModelNotFoundError(f"could not fetch config.json of {name!r} from the Hugging Face hub "
                                     f"({type(e).__name__}: {first})") from None
        return LoadedSpec(name, shape_from_hf_config(_read_json(cfg_path)))
    raise ModelNotFoundError(f"{name!r} is not a file, directory, alias ({', '.join(ALIASES)}) or hub id")


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def _inference(spec: LoadedSpec, args, device_memory: int | None) -> tuple[object, dict]:
    from turboinfer.memory import (estimate_inference, kv_tokens_that_fit, max_context_len, max_num_seqs,
                                   resolve_compute_dtype)
    from turboinfer.memory.gguf_header import gguf_weights

    compute = resolve_compute_dtype(args.dtype, args.device)
    quant = None if args.quantization == "none" else args.quantization
    kw = dict(dtype=args.dtype, quantization=quant, group_size=args.group_size, kv_cache_dtype=args.kv_cache_dtype,
              max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
              tp_size=args.tensor_parallel_size, device=args.device)
    if spec.gguf is not None:
        if quant:
            raise InvalidRequestError("--quantization applies to HF checkpoints; a GGUF file is counted as stored")
        if args.tensor_parallel_size > 1:
            raise InvalidRequestError("tensor-parallel estimates need an HF config; GGUF files are not sharded")
        w = gguf_weights(spec.gguf, compute, "cuda" if args.device.startswith("cuda") else "cpu")
        types = ", ".join(f"{k} x{n}" for k, (n, _) in sorted(w.by_type.items()))
        if args.dequantize_gguf:
            kw.update(weight_bytes=w.dequantized_bytes, weights_note=f"GGUF dequantized to {compute} ({types})")
        else:
            kw.update(weight_bytes=w.packed_bytes, weights_note=f"GGUF kept quantized ({types}), float tensors "
                      f"in {compute}; file payload {fmt_bytes(w.stored_bytes)}")
    elif spec.checkpoint_bytes is not None:
        kw["weights_note"] = f"{compute}; safetensors on disk {fmt_bytes(spec.checkpoint_bytes)}"
    est = estimate_inference(spec.shape, name=spec.name, max_model_len=args.max_model_len,
                             max_num_seqs=args.max_num_seqs, device_memory=device_memory, **kw)
    inverse = {}
    if device_memory is not None:
        kw.pop("weights_note", None)
        try:
            inverse = {"max_context_len": max_context_len(spec.shape, device_memory, args.max_num_seqs, **kw),
                       "max_num_seqs": max_num_seqs(spec.shape, device_memory, est.max_model_len, **kw),
                       "kv_tokens_that_fit": kv_tokens_that_fit(spec.shape, device_memory,
                                                                max_model_len=est.max_model_len,
                                                                max_num_seqs=args.max_num_seqs, **kw)}
        except InvalidRequestError as e:  # not even one block fits: report it beside the table
            inverse = {"max_context_len": 0, "max_num_seqs": 0, "kv_tokens_that_fit": 0, "nothing_fits": str(e)}
    return est, inverse


def _training(spec: LoadedSpec, args, device_memory: int | None):
    from turboinfer.memory import estimate_training

    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    targets = "all-linear" if args.lora_targets == "all-linear" else tuple(
        t.strip() for t in args.lora_targets.split(",") if t.strip())
    seq_len = args.seq_len or min(2048, spec.shape.max_position_embeddings)
    return estimate_training(spec.shape, name=spec.name, mode=args.mode, dtype=dtype, optimizer=args.optimizer,
                             master_weights=args.master_weights, batch_size=args.batch_size, seq_len=seq_len,
                             gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank,
                             lora_targets=targets, attention=args.attention, device=args.device,
                             device_memory=device_memory)


def _describe(spec: LoadedSpec) -> str:
    from turboinfer.memory import num_active_params, num_params

    s = spec.shape
    n, active = num_params(s), num_active_params(s)
    attn = ("MLA" if s.is_mla else "MHA" if s.num_kv_heads == s.num_heads else
            "MQA" if s.num_kv_heads == 1 else "GQA")
    moe = f", {s.num_experts} experts ({active / 1e9:.2f}B active)" if s.num_experts else ""
    return (f"{spec.name}: {s.model_type}, {s.num_layers} layers, hidden {s.hidden_size}, {attn} "
            f"{s.num_heads}/{s.num_kv_heads} heads, {n / 1e6:,.1f}M parameters{moe}")


def run(args) -> int:
    from turboinfer.config import parse_memory

    device_memory = parse_memory(args.device_memory) if args.device_memory else None
    spec = load_spec(args.model)
    if args.mode == "inference":
        est, inverse = _inference(spec, args, device_memory)
        title = (f"inference on {est.device} x{est.tp_size}, {est.dtype}, max_model_len {est.max_model_len}, "
                 f"max_num_seqs {est.max_num_seqs}" + (" (per device)" if est.tp_size > 1 else ""))
    else:
        est, inverse = _training(spec, args, device_memory), {}
        title = f"{args.mode} fine-tuning on {args.device}, {est.dtype}, {est.optimizer}"
    if args.json:
        out = {"model": spec.name, "mode": args.mode, **est.to_dict(), **inverse}
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(_describe(spec))
    print(title)
    for label, nbytes, note in est.breakdown():
        print(f"  {label:18} {fmt_bytes(nbytes):>12}  {note}")
    print(f"  {'total':18} {fmt_bytes(est.total):>12}")
    if args.mode == "inference":
        print(f"KV cache per token: {est.kv_bytes_per_token:,} B ({est.kv_cache_dtype})")
    for note in est.notes:
        print(f"note: {note}")
    if device_memory is not None:
        verdict = "fits" if est.fits else "does NOT fit"
        print(f"{fmt_bytes(device_memory)} per device: {verdict} ({100 * est.total / device_memory:.1f}% used)")
        if inverse.get("nothing_fits"):
            print(f"  {inverse['nothing_fits']}")
        elif inverse:
            limit = spec.shape.max_position_embeddings
            print(f"  longest context for {args.max_num_seqs} sequence(s): {inverse['max_context_len']:,} tokens "
                  f"(the model's limit: {limit:,})")
            print(f"  most sequences of {est.max_model_len:,} tokens: {inverse['max_num_seqs']:,}")
            print(f"  KV tokens that fit: {inverse['kv_tokens_that_fit']:,}")
    return 0
