"""`turboinfer quantize MODEL OUT_DIR --method int8|int4|awq|gptq|awq-gptq`: write a quantized copy of a float HF
checkpoint.

The model is loaded and quantized exactly as `--quantization` does at load (same dtype, same calibration), then
each quantized layer is split back into its checkpoint shards (q/k/v, gate/up) and stored under the checkpoint's
own names, so loading OUT_DIR gives the same weights without quantizing again. Format:
layers/quantization/checkpoint.py."""

from __future__ import annotations

import argparse
import importlib
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from turboinfer.errors import InvalidRequestError

# --method -> (quantization, awq, gptq)
METHODS = {"int8": ("int8", False, False), "int4": ("int4", False, False), "awq": ("int4", True, False),
           "gptq": ("int4", False, True), "awq-gptq": ("int4", True, True)}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
MAX_SHARD_BYTES = 2 * 2**30


def add_parser(subparsers) -> argparse.ArgumentParser:
    help_text = "write an int8 / int4 / AWQ / GPTQ / AWQ+GPTQ-int4 quantized copy of a float safetensors model"
    p = subparsers.add_parser("quantize", help=help_text, description=help_text)
    p.add_argument("model", help="float model: alias, local HF directory or hub id")
    p.add_argument("out_dir", help="directory to write (created; must be empty if it exists)")
    p.add_argument("--method", choices=sorted(METHODS), required=True,
                   help="int8: per output channel; int4: per group, round to nearest; awq: int4 with "
                        "activation-aware scales from a built-in calibration text; gptq: int4 with GPTQ's error "
                        "compensation, layer by layer on that text; awq-gptq: AWQ's scales, then GPTQ's rounding "
                        "(the lowest error of the four int4 methods, the slowest to compute)")
    p.add_argument("--group-size", type=int, default=128, help="int4 group size: 32|64|128|256 (default: 128)")
    p.add_argument("--dtype", default="auto", help="dtype the model is loaded (and calibrated) in, as for --dtype "
                   "when serving; quantizing at load with the same dtype gives identical weights (default: auto)")
    p.add_argument("--device", default="cpu", help="device for loading and calibration (default: cpu)")
    return p


def run(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    stats = quantize_checkpoint(args.model, args.out_dir, args.method, args.group_size, args.dtype, args.device)
    print(f"Wrote {args.out_dir}: {stats['num_quantized']} linear layers quantized ({args.method}), "
          f"{stats['bytes_in'] / 2**20:.1f} MiB -> {stats['bytes_out'] / 2**20:.1f} MiB of weights in "
          f"{time.monotonic() - t0:.1f}s", file=sys.stderr)
    return 0


def quantize_checkpoint(model: str, out_dir: str, method: str, group_size: int = 128, dtype: str = "auto",
                        device: str = "cpu") -> dict:
    from turboinfer.config import EngineConfig
    from turboinfer.layers.quantization.checkpoint import quantization_config
    from turboinfer.loader.model_loader import check_quantization, checkpoint_quantization
    from turboinfer.loader.resolve import resolve_model

    if method not in METHODS:
        raise InvalidRequestError(f"--method {method!r} is not one of {', '.join(sorted(METHODS))}")
    quantization, awq, gptq = METHODS[method]
    cfg = EngineConfig(model=model, dtype=dtype, device=device, quantization=quantization,
                       quant_group_size=group_size, awq=awq, gptq=gptq)
    resolved = resolve_model(model)
    check_quantization(resolved, quantization, group_size, awq, gptq)  # GGUF: refused
    if checkpoint_quantization(resolved) is not None:
        raise InvalidRequestError(f"{resolved.display_name} is already quantized; quantize the float model")
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InvalidRequestError(f"{out_dir} exists and is not empty")
    dev = torch.device(cfg.resolved_device())
    net, quantized = _load_and_quantize(resolved, dev, cfg.resolved_dtype(dev.type), cfg)
    out.mkdir(parents=True, exist_ok=True)
    bytes_in, bytes_out = _write_weights(resolved.path, out, net, quantized)
    _copy_side_files(resolved.path, out)
    hf_cfg = json.loads((Path(resolved.path) / "config.json").read_text())
    hf_cfg["quantization_config"] = quantization_config(quantization, group_size, awq, gptq)
    (out / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
    return {"num_quantized": len(quantized), "bytes_in": bytes_in, "bytes_out": bytes_out}


def _load_and_quantize(resolved, device: torch.device, dtype: torch.dtype, cfg):
    from turboinfer.loader.model_loader import load_arch, load_tokenizer, load_weights_into, quantize_loaded
    from turboinfer.models.registry import build_model

    arch = load_arch(resolved)
    net = build_model(arch, device, dtype)
    load_weights_into(net, resolved, device)
    tokenizer = load_tokenizer(resolved) if cfg.awq or cfg.gptq else None
    return net, quantize_loaded(net, resolved, device, cfg.quantization, cfg.quant_group_size, cfg.awq, tokenizer,
                                cfg.gptq)


def _checkpoint_targets(net: torch.nn.Module, quantized: dict):
    """A function from a checkpoint tensor name to (module name, row offset, rows) of its quantized layer, or
    None when the tensor is stored unchanged. Inverts the model's merge of q/k/v and gate/up (`STACKED`)."""
    stacked = getattr(importlib.import_module(type(net).__module__), "STACKED", {})
    modules = dict(net.named_modules())

    def target(name: str):
        if not name.endswith(".weight"):
            return None
        module, shard = name[:-len(".weight")], None
        for frag, (merged, shard_id) in stacked.items():
            if frag in name:
                module, shard = name.replace(frag, merged)[:-len(".weight")], shard_id
                break
        if module not in quantized:
            return None
        offset, size = modules[module].shard_offset(shard)
        return module, offset, size

    return target


def _write_weights(src: str, out: Path, net: torch.nn.Module, quantized: dict) -> tuple[int, int]:
    """Stream the float checkpoint, swapping each quantized weight for its stored parts; files of at most
    MAX_SHARD_BYTES are written as they fill. Returns (bytes read, bytes written)."""
    from safetensors.torch import save_file

    from turboinfer.layers.quantization.checkpoint import to_tensors
    from turboinfer.loader.model_loader import iter_safetensors

    target = _checkpoint_targets(net, quantized)
    files: list[tuple[Path, list[str]]] = []
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = bytes_in = bytes_out = 0

    def flush() -> None:
        path = out / f"part-{len(files):05d}.safetensors"
        save_file(pending, str(path), metadata={"format": "pt"})
        files.append((path, list(pending)))
        pending.clear()

    for name, tensor in iter_safetensors(src):
        bytes_in += tensor.numel() * tensor.element_size()
        t = target(name)
        if t is None:
            parts = {name: tensor.contiguous()}
        else:
            module, offset, size = t
            parts = to_tensors(name[:-len(".weight")], quantized[module].rows(offset, size))
        nbytes = sum(p.numel() * p.element_size() for p in parts.values())
        if pending and pending_bytes + nbytes > MAX_SHARD_BYTES:
            flush()
            pending_bytes = 0
        pending.update(parts)
        pending_bytes += nbytes
        bytes_out += nbytes
    flush()
    if len(files) == 1:
        files[0][0].rename(out / "model.safetensors")
        return bytes_in, bytes_out
    weight_map = {}
    for i, (path, names) in enumerate(files):
        fname = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(out / fname)
        weight_map.update({k: fname for k in names})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": bytes_out}, "weight_map": weight_map}, indent=2) + "\n")
    return bytes_in, bytes_out


def _copy_side_files(src: str, out: Path) -> None:
    """Tokenizer, chat template, generation config, README...: every file but weights and config.json."""
    for p in Path(src).iterdir():
        if p.is_file() and p.name not in ("config.json", "model.safetensors.index.json") and \
                not p.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(p, out / p.name)

