"""Long prompts on CPU: time to first token and decode speed at a long context, turboinfer against llama.cpp
(llama-cpp-python), same GGUF, same token ids, same thread count, in one run.

    python benchmarks/long_context_cpu.py [--model PATH_OR_ALIAS] [--lengths 2048,4096,8000] [--threads 2]
                                          [--repeats 2] [--json benchmarks/results/long_context_cpu.json]

For each prompt length N: the prompt is benchmarks/data/lighthouses.txt repeated to N tokens (with a different
first token on each repeat, so neither engine reuses a cached prefix), then 32 greedy tokens. Time to first token
is the prompt's prefill plus one sampled token; decode tok/s is over the 31 tokens after the first, each one
attending to the whole prompt. Median of --repeats runs per engine. turboinfer runs with its defaults
(max_model_len 8192, chunked prefill of 512 tokens a step); llama.cpp with n_ctx = N + 64, n_batch 512.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "lighthouses.txt")
NEW_TOKENS = 32


def prompts(ids: list[int], n: int, repeats: int) -> list[list[int]]:
    """`repeats` prompts of n tokens that differ in their first token."""
    body = (ids * (n // len(ids) + 1))[:n - 1]
    return [[ids[i]] + body for i in range(repeats)]


def timings(stamps: list[float], start: float) -> dict:
    return {"ttft_s": stamps[0] - start, "decode_tok_s": (len(stamps) - 1) / (stamps[-1] - stamps[0])}


def bench_turboinfer(model: str, threads: int, runs: list[list[int]]) -> dict:
    from turboinfer import LLM, SamplingParams

    llm = LLM(model, num_threads=threads)
    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    llm.generate([runs[0][:64]], greedy, use_tqdm=False)  # warm-up
    out = []
    for p in runs:
        llm.engine.reset_prefix_cache()
        start = time.perf_counter()
        stamps = []
        for o in llm.stream(p, greedy):  # one output per step, prefill chunks included: stamp new tokens only
            if len(o.outputs[0].token_ids) > len(stamps):
                stamps.append(time.perf_counter())
        out.append(timings(stamps, start))
    return median(out)


def bench_llama_cpp(path: str, threads: int, runs: list[list[int]]) -> dict:
    from llama_cpp import Llama

    from turboinfer.bench.compare import check_llama_cpp

    check_llama_cpp(path, threads)
    llm = Llama(path, n_ctx=len(runs[0]) + 64, n_batch=512, n_threads=threads, n_threads_batch=threads,
                verbose=False)
    llm.eval(runs[0][:64])  # warm-up
    out = []
    for p in runs:
        llm.reset()  # no prefix reuse
        start = time.perf_counter()
        stamps = []
        for _ in llm.generate(p, temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == NEW_TOKENS:
                break
        out.append(timings(stamps, start))
    return median(out)


def median(runs: list[dict]) -> dict:
    return {"ttft_s": statistics.median(r["ttft_s"] for r in runs),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--lengths", default="2048,4096,8000")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "long_context_cpu.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cpu_bench import machine, write_record

    from turboinfer.bench.results import versions
    from turboinfer.loader.model_loader import load_tokenizer
    from turboinfer.loader.resolve import resolve_model

    resolved = resolve_model(args.model)
    ids = load_tokenizer(resolved).encode(open(TEXT).read(), add_special_tokens=False)
    rows = []
    for n in [int(x) for x in args.lengths.split(",")]:
        runs = prompts(ids, n, args.repeats)
        row = {"prompt_tokens": n, "turboinfer": bench_turboinfer(resolved.path, args.threads, runs),
               "llama.cpp": bench_llama_cpp(resolved.path, args.threads, runs)}
        print(row, file=sys.stderr, flush=True)
        rows.append(row)
    write_record(args.json, {
        "benchmark": "cpu_long_context", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": machine(), "versions": versions(),
        "model": resolved.display_name, "threads": args.threads, "repeats": args.repeats,
        "new_tokens": NEW_TOKENS, "rows": rows})


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
