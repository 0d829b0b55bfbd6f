"""CPU speed and perplexity of the default model, turboinfer against HF transformers and llama.cpp, in one run.

    python benchmarks/cpu_bench.py [--model PATH_OR_ALIAS] [--threads 2] [--json benchmarks/results/cpu.json]

Figures: batch-1 decode tok/s (128 tokens after a 16-token prompt, first token excluded; median of 3), 512-token
prefill tok/s (median of 5), aggregate decode tok/s of 16 concurrent prompts (turboinfer only), and perplexity over
benchmarks/data/lighthouses.txt (the same token ids fed to every engine). Each engine runs with the same
thread count. HF transformers loads the same GGUF (dequantized to float32 by the gguf package).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "lighthouses.txt")
DECODE_TOKENS = 128
PREFILL_TOKENS = 512
PREFILL_REPEATS = 5  # prefill is one ~0.5 s measurement: the median of five
DECODE_REPEATS = 3  # a shared 2-core machine varies by 10-20% from one second to the next: the median of three


def nll_from_logits(logits: torch.Tensor, ids: list[int]) -> float:
    """Mean negative log-likelihood of ids[1:] given logits [len(ids), vocab] (row i predicts token i+1)."""
    lp = torch.log_softmax(logits[:-1].float(), -1)
    return -lp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item()


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    caches = {}  # "AMD EPYC" names no generation; cache sizes and flags tell them apart (Zen 4: L1d 32K, Zen 5: 48K)
    for index in range(4):
        d = f"/sys/devices/system/cpu/cpu0/cache/index{index}"
        try:
            kind = open(f"{d}/type").read().strip()
            caches[f"L{open(f'{d}/level').read().strip()}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = \
                open(f"{d}/size").read().strip()
        except OSError:
            pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "caches": caches, "python": platform.python_version(),
            "torch": torch.__version__}
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
        info["amx"] = "amx_tile" in flags
    except (OSError, StopIteration):
        pass
    try:  # what llama.cpp was built with (e.g. without AMX where its AMX kernels crash): part of the anchor
        import llama_cpp

        info["llama_cpp_features"] = llama_cpp.llama_print_system_info().decode().strip(" |")
    except (ImportError, AttributeError, OSError):
        pass
    return info


def write_record(path: str, record: dict) -> None:
    """The JSON that benchmarks/report.py renders, and the same on stdout."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(record, indent=2))


def bench_turboinfer(model: str, threads: int, ids: list[int], prompt: list[int], **engine_kwargs) -> dict:
    from turboinfer import LLM, SamplingParams

    llm = LLM(model, num_threads=threads, max_model_len=2048, kv_cache_memory="512MiB", **engine_kwargs)
    greedy = SamplingParams(temperature=0, max_tokens=DECODE_TOKENS, ignore_eos=True)
    llm.generate([prompt], greedy, use_tqdm=False)  # warm-up
    decode_runs = []
    for _ in range(DECODE_REPEATS):
        llm.engine.reset_prefix_cache()
        stamps = [time.perf_counter() for _ in llm.stream(prompt[::-1], greedy)]
        decode_runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    decode = statistics.median(decode_runs)

    one = SamplingParams(temperature=0, max_tokens=1)
    long_prompt = ids[:PREFILL_TOKENS]
    llm.generate([long_prompt], one, use_tqdm=False)
    times = []
    for _ in range(PREFILL_REPEATS):
        llm.engine.reset_prefix_cache()
        t = time.perf_counter()
        llm.generate([long_prompt], one, use_tqdm=False)
        times.append(time.perf_counter() - t)
    prefill = PREFILL_TOKENS / statistics.median(times)

    prompts = [ids[i * 16:(i + 1) * 16] for i in range(16)]
    llm.engine.reset_prefix_cache()
    t = time.perf_counter()
    outs = llm.generate(prompts, greedy, use_tqdm=False)
    aggregate = sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)

    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    nll = -sum(d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1)
    w = llm.engine.executor.worker
    record = {"decode_tok_s": decode, "decode_runs_tok_s": decode_runs, "prefill_tok_s": prefill,
              "aggregate16_tok_s": aggregate,
              "perplexity": math.exp(nll), "dtype": str(w.dtype).replace("torch.", ""),
              "packed_layers": w.num_packed_layers, "c_decode_step": llm.engine.executor.worker.runner.cpu_decoder is not None}
    if record["c_decode_step"]:  # the same text through the decode step, one token at a time
        from turboinfer.bench.probe import teacher_forced_logits

        record["perplexity_decode_step"] = math.exp(nll_from_logits(teacher_forced_logits(llm, ids), ids))
    return record


def perplexity_turboinfer(model: str, threads: int, ids: list[int], **engine_kwargs) -> float:
    from turboinfer import LLM, SamplingParams

    llm = LLM(model, num_threads=threads, max_model_len=2048, kv_cache_memory="256MiB", **engine_kwargs)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return math.exp(-sum(d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1))


RSS_PROBE = """
import gc, json, sys
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
import torch, turboinfer.llm
import gguf, jinja2, numpy, safetensors, tokenizers  # libraries loading uses: code, not model data
gc.collect(); before = rss()
llm = turboinfer.llm.LLM(sys.argv[1], kv_cache_memory='64MiB', max_model_len=2048)
gc.collect()
print(json.dumps({"rss_increase": rss() - before, "kv_bytes": llm.engine.executor.worker.runner.kv_cache_bytes(),
                  "kv_resident": llm.engine.executor.worker.runner.kv_cache_resident_bytes()}))
"""


def resident_memory(model: str) -> dict:
    """Resident-set growth of a fresh process from `import turboinfer` (and the libraries its loader imports) to
    a loaded engine with a 64 MiB KV pool."""
    import subprocess

    out = subprocess.run([sys.executable, "-c", RSS_PROBE, model], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["file_bytes"] = os.path.getsize(model)
    r["ratio_to_file_excluding_kv"] = (r["rss_increase"] - r["kv_resident"]) / r["file_bytes"]
    return r


def bench_hf(gguf_path: str, threads: int, ids: list[int], prompt: list[int]) -> dict:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    d, name = os.path.split(gguf_path)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    with torch.no_grad():
        x = torch.tensor([prompt])
        model.generate(x, max_new_tokens=4, do_sample=False)
        t = time.perf_counter()
        model.generate(x, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        t1 = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(x, max_new_tokens=DECODE_TOKENS, min_new_tokens=DECODE_TOKENS, do_sample=False)
        decode = (DECODE_TOKENS - 1) / (time.perf_counter() - t - t1)
        long_prompt = torch.tensor([ids[:PREFILL_TOKENS]])
        model(long_prompt)
        times = []
        for _ in range(PREFILL_REPEATS):
            t = time.perf_counter()
            model(long_prompt)
            times.append(time.perf_counter() - t)
        prefill = PREFILL_TOKENS / statistics.median(times)
        logits = model(torch.tensor([ids])).logits[0]
    return {"decode_tok_s": decode, "prefill_tok_s": prefill, "perplexity": math.exp(nll_from_logits(logits, ids))}


def bench_llama_cpp(gguf_path: str, threads: int, ids: list[int], prompt: list[int]) -> dict:
    from llama_cpp import Llama

    from turboinfer.bench.compare import check_llama_cpp

    check_llama_cpp(gguf_path, threads)  # a build that crashes here fails with a message, not a segfault
    llm = Llama(gguf_path, n_ctx=2048, n_batch=512, n_threads=threads, n_threads_batch=threads,
                logits_all=True, verbose=False)
    llm.reset()
    llm.eval(prompt)
    # decode: feed one token at a time, greedy, as a chat loop would
    decode_runs = []
    for _ in range(DECODE_REPEATS):
        stamps = []
        for tok in llm.generate(prompt[::-1], temp=0.0, reset=True):
            stamps.append(time.perf_counter())
            if len(stamps) == DECODE_TOKENS:
                break
        decode_runs.append((len(stamps) - 1) / (stamps[-1] - stamps[0]))
    decode = statistics.median(decode_runs)
    llm.reset()
    llm.eval(ids[:PREFILL_TOKENS])
    times = []
    for _ in range(PREFILL_REPEATS):
        llm.reset()
        t = time.perf_counter()
        llm.eval(ids[:PREFILL_TOKENS])
        times.append(time.perf_counter() - t)
    prefill = PREFILL_TOKENS / statistics.median(times)
    llm.reset()
    llm.eval(ids)
    logits = torch.tensor(llm.scores[: len(ids)])
    return {"decode_tok_s": decode, "decode_runs_tok_s": decode_runs, "prefill_tok_s": prefill,
            "perplexity": math.exp(nll_from_logits(logits, ids))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", default="", help="comma list of engines to skip: hf,llama.cpp")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "cpu_default_model.json"))
    args = ap.parse_args()

    from turboinfer import LLM  # noqa: F401  (import first: resolves and caches the default model)
    from turboinfer.loader.resolve import resolve_model
    from turboinfer.loader.model_loader import load_tokenizer

    resolved = resolve_model(args.model)
    tok = load_tokenizer(resolved)
    ids = tok.encode(open(TEXT).read(), add_special_tokens=False)
    prompt = ids[:16]
    skip = set(filter(None, args.skip.split(",")))
    results = {}
    print(f"text: {len(ids)} tokens; threads: {args.threads}", file=sys.stderr)
    results["turboinfer"] = bench_turboinfer(resolved.path, args.threads, ids, prompt)
    print("turboinfer", results["turboinfer"], file=sys.stderr)
    results["turboinfer_float32"] = bench_turboinfer(resolved.path, args.threads, ids, prompt, dtype="float32",
                                                     dequantize_gguf=True)
    print("turboinfer_float32", results["turboinfer_float32"], file=sys.stderr)
    results["turboinfer_kv_int8"] = {"perplexity": perplexity_turboinfer(resolved.path, args.threads, ids,
                                                                         kv_cache_dtype="int8")}
    results["memory"] = resident_memory(resolved.path)
    print("memory", results["memory"], file=sys.stderr)
    if "hf" not in skip:
        results["transformers"] = bench_hf(resolved.path, args.threads, ids, prompt)
        print("transformers", results["transformers"], file=sys.stderr)
    if "llama.cpp" not in skip:
        results["llama.cpp"] = bench_llama_cpp(resolved.path, args.threads, ids, prompt)
        print("llama.cpp", results["llama.cpp"], file=sys.stderr)
    record = {"benchmark": "cpu_default_model", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "machine": machine(), "model": resolved.display_name,
              "threads": args.threads, "text_tokens": len(ids), "results": results}
    write_record(args.json, record)


if __name__ == "__main__":
    main()
