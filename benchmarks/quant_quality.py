"""Perplexity of weight quantization on the default model: float32 against int8 and int4 (round-to-nearest, AWQ,
GPTQ, AWQ then GPTQ) at several group sizes, and each one's KL divergence from float, over the whole of
benchmarks/data/lighthouses.txt (1,141 tokens).

    python benchmarks/quant_quality.py [--model ALIAS_OR_PATH] [--tokens N] [--group-sizes 32,64,128]
                                       [--threads 1] [--json benchmarks/results/quant_quality_cpu.json]
                                       [--text PATH] [--methods gptq,awq-gptq]

`--model gemma3-270m` scores the second model available offline (its GGUF stores most quantized layers at 5 to 8
bits); `--text` another text, to check that a figure is not the benchmark text's alone.

The float weights are a GGUF's dequantized to float32 (the default model ships only as Q4_1 GGUF), then quantized
exactly as `--quantization` does at load (`quantize_loaded`, same calibration text). Every configuration runs the
same token ids through one prefill of the same model object, whose float Linears are put back between runs;
quantized layers run the CPU int4/int8 kernels (bfloat16 activations inside the matmul), as when serving.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "lighthouses.txt")


def full_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """[len(ids), vocab] float32 logits of one prefill."""
    from turboinfer.layers.quantization.awq import calibration_batch

    with calibration_batch(model, len(ids)) as (positions, meta), torch.inference_mode():
        return model.compute_logits(model(torch.tensor(ids), positions, meta)).float()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    lp = torch.log_softmax(logits[:-1], -1)  # row i predicts token i + 1
    return math.exp(-lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item())


def divergence(logits: torch.Tensor, ref: torch.Tensor) -> dict:
    """llama.cpp's --kl-divergence figures against the float model over the same tokens: mean and 99th
    percentile of KL(p_float || p_quant) per token (nats), and how often both pick the same top token. Less noisy
    than a perplexity difference, which a change can win on one span of text and lose on another."""
    lp, lr = torch.log_softmax(logits, -1), torch.log_softmax(ref, -1)
    kl = (lr.exp() * (lr - lp)).sum(-1)
    return {"kl_mean": kl.mean().item(), "kl_p99": kl.quantile(0.99).item(),
            "top1_agreement": (logits.argmax(-1) == ref.argmax(-1)).float().mean().item()}


def _checkpoint_names(name: str) -> list[str]:
    """The checkpoint tensors a merged Linear was loaded from (qkv_proj -> q/k/v_proj, gate_up -> gate/up)."""
    from turboinfer.models.llama import STACKED

    full = name + ".weight"
    return [full.replace(merged, frag) for frag, (merged, _) in STACKED.items() if merged in full] or [full]


def configurations(group_sizes: list[int]) -> list[dict]:
    rows = [dict(method="float32"), dict(method="int8")]
    for g in group_sizes:
        rows += [dict(method=m, group_size=g) for m in ("int4", "awq", "gptq", "awq-gptq")]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=0, help="score only the first N tokens of the text (0: all)")
    ap.add_argument("--group-sizes", default="32,64,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--text", default=TEXT, help="the text to score (default: benchmarks/data/lighthouses.txt)")
    ap.add_argument("--methods", default="", help="comma-separated subset of int8,int4,awq,gptq,awq-gptq "
                    "(float32 always runs; default: all)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "quant_quality_cpu.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from turboinfer.bench.results import machine_info, versions
    from turboinfer.layers.linear import UnquantizedMethod
    from turboinfer.layers.quantization.awq import calibration_segments
    from turboinfer.layers.quantization.transform import layer_group_size, quantizable_linears
    from turboinfer.loader.model_loader import load_arch, load_tokenizer, load_weights_into, quantize_loaded
    from turboinfer.loader.resolve import resolve_model
    from turboinfer.models.registry import build_model

    resolved = resolve_model(args.model)
    tokenizer = load_tokenizer(resolved)
    ids = tokenizer.encode(open(args.text).read(), add_special_tokens=False)[:args.tokens or None]
    device = torch.device("cpu")
    model = build_model(load_arch(resolved), device, torch.float32)
    load_weights_into(model, resolved, device, keep_packed=False)  # GGUF 4-bit blocks -> float32
    linears = quantizable_linears(model)
    float_weights = {name: m.weight for name, m in linears}

    ref = None
    rows = []
    wanted = set(filter(None, args.methods.split(","))) | {"float32"}
    for cfg in configurations([int(g) for g in args.group_sizes.split(",")]):
        if args.methods and cfg["method"] not in wanted:
            continue
        for name, m in linears:  # back to the float model
            m.weight, m.quant_method = float_weights[name], UnquantizedMethod()
        method, g = cfg["method"], cfg.get("group_size", 128)
        t = time.perf_counter()
        if method != "float32":
            quantize_loaded(model, resolved, device, "int8" if method == "int8" else "int4", g, "awq" in method,
                            tokenizer, "gptq" in method)
        seconds = time.perf_counter() - t
        logits = full_logits(model, ids)
        ref = logits if ref is None else ref
        row = {**cfg, "perplexity": perplexity(logits, ids),
               "rel_logit_error": ((logits - ref).norm() / ref.norm()).item(), **divergence(logits, ref),
               "quantize_s": seconds}
        if "group_size" in cfg:  # what each layer width really got (a size that does not divide it falls back)
            widths = sorted({m.in_features for _, m in linears})
            row["layer_group_sizes"] = {str(k): layer_group_size(k, g) for k in widths}
        row["vs_float_pct"] = 100 * (row["perplexity"] / rows[0]["perplexity"] - 1) if rows else 0.0
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)

    segments = calibration_segments(tokenizer)
    source_types = {}
    if resolved.kind == "gguf":  # what the "float" weights of the quantized layers were stored as
        from turboinfer.loader.gguf_dequant import type_name
        from turboinfer.loader.gguf_file import GGUFFile

        f = GGUFFile(resolved.path)
        for name, _ in linears:
            for part in _checkpoint_names(name):
                if part in f.tensor_names():
                    t = type_name(f.raw_tensor(part)[0])
                    source_types[t] = source_types.get(t, 0) + 1
    record = {"benchmark": "quant_quality_cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "machine": machine_info(), "versions": versions(),
              "model": resolved.display_name,
              "float_source": "GGUF dequantized to float32" if resolved.kind == "gguf" else "checkpoint",
              "source_types": source_types, "threads": args.threads,
              "text": os.path.relpath(args.text, os.path.dirname(HERE)) if args.text == TEXT else args.text,
              "text_tokens": len(ids),
              "calibration_tokens": len(segments[0]), "gptq_calibration_tokens": sum(map(len, segments)),
              "rows": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
