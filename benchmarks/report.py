"""Render BENCHMARKS.md from the JSON results under benchmarks/results/ (never edit BENCHMARKS.md by hand).

    python benchmarks/report.py            # rewrites BENCHMARKS.md
    turboinfer bench report                # the same

Renderers: cpu_default_model (benchmarks/cpu_bench.py), cpu_gguf_types (benchmarks/gguf_types.py), memory_cpu (benchmarks/memory_bench.py),
quant_quality_cpu (benchmarks/quant_quality.py) and bench_latency / bench_throughput / bench_serve
(`turboinfer bench ... --json benchmarks/results/NAME.json`).
"""

from __future__ import annotations

import argparse
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.path.dirname(HERE), "BENCHMARKS.md")


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:,.{digits}f}"


def _caches(m: dict) -> str:
    c = m.get("caches")
    return "; " + ", ".join(f"{k} {v}" for k, v in c.items()) if c else ""


def render_cpu_default_model(r: dict) -> str:
    res = r["results"]
    ours = res["turboinfer"]
    hf, lc = res.get("transformers", {}), res.get("llama.cpp", {})
    m = r["machine"]
    default = r["model"] == "smollm2-135m-instruct"
    about = "(SmolLM2-135M-Instruct, Q4_1 GGUF)" if default else "(GGUF)"
    lines = [
        f"## {'Default model' if default else r['model']} on CPU: turboinfer vs "
        f"{'HF transformers vs ' if hf else ''}llama.cpp",
        "",
        f"Model `{r['model']}` {about}, {r['threads']} threads, "
        f"{m['cpu']} ({m['cores']} cores{_caches(m)}), torch {m['torch']}, {r['date']}.",
        f"Command: `{r['command']}`.",
        "",
        "Decode: 128 greedy tokens after a 16-token prompt, batch 1 (median of 3 runs where the JSON lists them). "
        "Prefill: one 512-token prompt (median of 5). "
        "Aggregate: 16 prompts decoded concurrently. Perplexity: "
        f"`benchmarks/data/lighthouses.txt` ({r['text_tokens']} tokens, the same ids for every engine).",
        "",
        "| engine | weights / compute | decode tok/s | prefill tok/s | 16-way aggregate tok/s | perplexity |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = [("turboinfer", f"{'Q4' if default else 'GGUF'} packed / {ours.get('dtype')}", ours),
            ("turboinfer", "dequantized / float32", res.get("turboinfer_float32")),
            ("HF transformers", "dequantized / float32", hf or None),
            ("llama.cpp (llama-cpp-python)", f"{'Q4_1' if default else 'GGUF'} / native", lc or None)]
    for name, kind, v in rows:
        if not v:
            continue
        lines.append(f"| {name} | {kind} | {_fmt(v.get('decode_tok_s'))} | {_fmt(v.get('prefill_tok_s'))} | "
                     f"{_fmt(v.get('aggregate16_tok_s'))} | {_fmt(v.get('perplexity'), 3)} |")
    lines.append("")
    ratios = []
    if hf:
        ratios.append(f"decode {ours['decode_tok_s'] / hf['decode_tok_s']:.2f}x and prefill "
                      f"{ours['prefill_tok_s'] / hf['prefill_tok_s']:.2f}x HF transformers")
    if lc:
        ratios.append(f"decode {ours['decode_tok_s'] / lc['decode_tok_s']:.2f}x and prefill "
                      f"{ours['prefill_tok_s'] / lc['prefill_tok_s']:.2f}x llama.cpp; perplexity "
                      f"{100 * (res['turboinfer_float32']['perplexity'] / lc['perplexity'] - 1):+.2f}% (float32 path) "
                      f"and {100 * (ours['perplexity'] / lc['perplexity'] - 1):+.2f}% (packed path) vs llama.cpp")
    ratios.append(f"16-way aggregate = {ours['aggregate16_tok_s'] / ours['decode_tok_s']:.1f}x our batch-1 decode")
    lines.append("Ratios (turboinfer packed path): " + "; ".join(ratios) + ".")
    if lc and m.get("llama_cpp_features"):
        amx = " The CPU has AMX; this llama.cpp build does not use it." if m.get("amx") and \
            "AMX" not in m["llama_cpp_features"] else ""
        lines += ["", f"llama.cpp's build: `{m['llama_cpp_features']}`.{amx}"]
    if ours.get("perplexity_decode_step"):
        lines += ["", "Decode runs as one C call per step (docs/cpu_decode.md). The whole text fed through that step "
                      f"one token at a time: perplexity {ours['perplexity_decode_step']:.3f} "
                      f"({100 * (ours['perplexity_decode_step'] / res['turboinfer_float32']['perplexity'] - 1):+.2f}% "
                      "vs the float32 dequantized path)."]
    kv8 = res.get("turboinfer_kv_int8")
    if kv8:
        lines += ["", f"int8 KV cache (packed path otherwise): perplexity {kv8['perplexity']:.3f}, "
                      f"{100 * (kv8['perplexity'] / ours['perplexity'] - 1):+.2f}% vs the bf16 cache."]
    mem = res.get("memory")
    if mem:
        mib = 2 ** 20
        lines += ["", f"Resident memory: a fresh process grows by {mem['rss_increase'] / mib:.0f} MiB from "
                      f"`import turboinfer` (and the loader's libraries) to a loaded engine, of which "
                      f"{mem.get('kv_resident', mem['kv_bytes']) / mib:.0f} MiB is the KV pool's resident part; the rest is {mem['ratio_to_file_excluding_kv']:.2f}x the "
                      f"{mem['file_bytes'] / mib:.0f} MiB GGUF file (weights, tokenizer, runtime)."]
    return "\n".join(lines)


def _machine(r: dict) -> str:
    """One line: CPU (cores), GPU if any, versions, date."""
    m, v = r["machine"], r.get("versions", {})
    gpu = m.get("gpu")
    hw = f"{m['cpu']} ({m.get('usable_cores') or m['cores']} usable cores)"
    if gpu:
        hw += f", {gpu['name']} ({gpu['memory_bytes'] / 2**30:.0f} GiB)"
    sw = ", ".join(f"{k} {v[k]}" for k in ("turboinfer", "torch", "transformers", "llama_cpp_python") if k in v)
    return f"Machine: {hw}; {sw + '; ' if sw else ''}{r['date']}."


def _ms(stats: dict, key: str = "mean") -> str:
    return _fmt(stats.get(key) if stats else None, 2)


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def render_bench_latency(r: dict) -> str:
    c = r["config"]
    ours = r["engines"]["turboinfer"]
    lines = [f"## Latency: batch {c['batch_size']}, {c['input_len']} prompt -> {c['output_len']} output tokens",
             "", f"Model `{r['model']}` ({ours['dtype']} on {ours['device']}, {c['num_iters']} measured iterations). "
             + _machine(r), f"Command: `{r['command']}`.", "",
             "| engine | TTFT ms | TPOT ms | ITL p50 / p99 ms | end-to-end ms | output tok/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, e in r["engines"].items():
        lines.append(f"| {name} | {_ms(e['ttft_ms'])} | {_ms(e['tpot_ms'])} | {_ms(e['itl_ms'], 'p50')} / "
                     f"{_ms(e['itl_ms'], 'p99')} | {_ms(e['e2e_ms'])} | {_fmt(e['output_tok_s'])} |")
    lines += ["", "Means over requests; TTFT includes the prefill, TPOT is the mean gap after the first token."]
    bw = ours.get("bandwidth")
    if bw and bw.get("utilization") is not None:
        lines.append(f"Decode reads {bw['weight_bytes'] / 2**20:,.1f} MiB of weights per step; at "
                     f"{bw['copy_bytes_s'] / 1e9:,.1f} GB/s measured copy bandwidth that is "
                     f"{100 * bw['utilization']:.1f}% bandwidth utilisation.")
    for name, x in r.get("ratios", {}).items():
        lines.append(f"vs {name}: TTFT {_x(x['ttft'])} faster, TPOT {_x(x['tpot'])} faster, "
                     f"output tok/s {_x(x['output_tok_s'])}.")
    return "\n".join(lines)


def render_bench_throughput(r: dict) -> str:
    c = r["config"]
    ours = r["engines"]["turboinfer"]
    lines = [f"## Offline throughput: {c['num_prompts']} prompts, input {c['input_len']}, output {c['output_len']} "
             "tokens", "", f"Model `{r['model']}` ({ours['dtype']} on {ours['device']}); lengths uniform in the "
             f"ranges, seeded{', EOS ignored' if c['ignore_eos'] else ''}. " + _machine(r),
             f"Command: `{r['command']}`.", "",
             "| engine | seconds | requests/s | output tok/s | total tok/s |", "|---|---:|---:|---:|---:|"]
    for name, e in r["engines"].items():
        label = f"{name} (batches of {e['batch_size']})" if "batch_size" in e else name
        lines.append(f"| {label} | {_fmt(e['elapsed_s'], 2)} | {_fmt(e['request_s'], 2)} | {_fmt(e['output_tok_s'])} "
                     f"| {_fmt(e['total_tok_s'])} |")
    ratios = [f"{_x(x['output_tok_s'])} {name}" for name, x in r.get("ratios", {}).items()]
    if ratios:
        lines += ["", "turboinfer output tokens/s = " + ", ".join(ratios) + "."]
    return "\n".join(lines)


def render_bench_serve(r: dict) -> str:
    c = r["config"]
    work = {"random": f"random words, prompt {c['input_len']}", "sharegpt": f"ShareGPT file `{c['dataset']}`",
            "shared-prefix": f"{c['prefix_len']}-word shared prefix + prompt {c['input_len']}"}[c["workload"]]
    slo = c.get("slo_ms") or {}
    lines = [f"## Serving: {c['workload']} workload, {c['num_prompts']} requests per level", "",
             f"Streaming `/v1/completions`, {work}, max_tokens {c['output_len'] or 'from the dataset'} (mean prompt "
             f"~{c['mean_prompt_len']:.0f}, mean output {c['mean_output_len']:.0f} tokens), "
             + ("all requests sent at once (up to the concurrency). " if c["request_rate"] == "inf" else
                f"Poisson arrivals at {c['request_rate']:g} requests/s. ") + _machine(r),
             f"Command: `{r['command']}`.", "",
             "| endpoint | concurrency | requests/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | "
             "ITL p99 ms | E2E p50 / p99 ms |" + (" goodput req/s |" if slo else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if slo else "")]
    for name, e in r["engines"].items():
        for lv in e["levels"]:
            row = (f"| {name} | {lv['concurrency'] or 'uncapped'} | {_fmt(lv['request_s'], 2)} | "
                   f"{_fmt(lv['output_tok_s'])} | {_ms(lv['ttft_ms'], 'p50')} / {_ms(lv['ttft_ms'], 'p99')} | "
                   f"{_ms(lv['tpot_ms'], 'p50')} / {_ms(lv['tpot_ms'], 'p99')} | {_ms(lv['itl_ms'], 'p99')} | "
                   f"{_ms(lv['e2e_ms'], 'p50')} / {_ms(lv['e2e_ms'], 'p99')} |")
            lines.append(row + (f" {_fmt(lv['goodput_req_s'], 2)} |" if slo else ""))
    if slo:
        lines += ["", "Goodput: completed requests/s meeting " + ", ".join(f"{k} <= {v:g} ms" for k, v in slo.items())
                  + "."]
    for name, rows in r.get("ratios", {}).items():
        lines += ["", f"vs {name}: " + "; ".join(f"concurrency {x['concurrency'] or 'uncapped'}: output tok/s "
                                                 f"{_x(x['output_tok_s'])}, TTFT p50 {_x(x['ttft_p50'])} faster"
                                                 for x in rows) + "."]
    return "\n".join(lines)


def render_memory_cpu(r: dict) -> str:
    mib = 2 ** 20
    lines = ["## Memory estimator vs measured peak (CPU)", "", _machine(r), f"Command: `{r['command']}`.", "",
             "Peak resident memory of a fresh process over a full batch (the peak is reset after loading; the "
             "loading peak is listed apart; every KV block is written once first, since on CPU the pool becomes "
             "resident as it is used) against `turboinfer estimate`'s total for the same settings.", "",
             "| model | max_model_len | sequences | KV dtype | dtype | estimate MiB | measured peak MiB | ratio | "
             "KV pool = estimate | loading peak MiB |",
             "|---|---:|---:|---|---|---:|---:|---:|---|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x.get('model', r.get('model'))} | {x['max_model_len']} | {x['max_num_seqs']} | {x['kv_cache_dtype']} | {x['dtype']} | "
                     f"{x['estimate'] / mib:.0f} | {x['peak_rss'] / mib:.0f} | {x['ratio']:.2f} | "
                     f"{'yes' if x['kv_bytes'] == x['kv_estimate'] else 'no'} | {x['peak_rss_after_load'] / mib:.0f} |")
    load = r.get("load")
    if load:
        kv_resident = load.get("kv_resident", load["kv_bytes"])  # before the pool was lazily resident: all of it
        extra = load["rss_after_load"] - load["rss_before"] - kv_resident
        lines += ["", f"Resident memory after loading `{load['model']}` (RSS after `LLM(...)` minus RSS right after "
                      f"`{load.get('baseline', 'import torch, turboinfer')}`, the KV pool's resident "
                      f"{kv_resident / mib:.1f} MiB (of {load['kv_bytes'] / mib:.1f} MiB) taken out): "
                      f"{extra / mib:.0f} MiB = **{load['load_rss_ratio']:.2f}x** the {load['file_bytes'] / mib:.1f} MiB "
                      f"file; anonymous memory alone {load['load_anon_ratio']:.2f}x (the rest, "
                      f"{load['file_backed_increase'] / mib:.1f} MiB, is shared-library code run for the first time "
                      f"while loading; no model file stays mapped). Peak during loading: +{load['peak_increase'] / mib:.0f} "
                      f"MiB; load time {load['load_seconds']:.1f} s. Breakdown: docs/memory.md."]
    return "\n".join(lines)


def _kl(row: dict) -> str:
    return f"{row['kl_mean']:.4f} / {row['kl_p99']:.3f}" if "kl_mean" in row else "-"


def _top1(row: dict) -> str:
    return f"{100 * row['top1_agreement']:.1f}%" if "top1_agreement" in row else "-"


def _calibration(r: dict) -> str:
    if "gptq_calibration_tokens" in r:  # the built-in text as 512-token segments; AWQ reads the first one
        return (f"AWQ calibrates on the first passage of the built-in text ({r['calibration_tokens']} tokens), GPTQ "
                f"and AWQ + GPTQ on all of it ({r['gptq_calibration_tokens']} tokens).")
    return f"AWQ and GPTQ calibrate on the built-in text ({r['calibration_tokens']} tokens)."


def render_quant_quality_cpu(r: dict) -> str:
    names = {"float32": "float32", "int8": "int8 (per channel)", "int4": "int4 round-to-nearest",
             "awq": "int4 AWQ", "gptq": "int4 GPTQ", "awq-gptq": "int4 AWQ + GPTQ"}
    lines = [f"## Quantization quality: {r['model']}", "",
             f"Model `{r['model']}`, float weights: {r['float_source']}; perplexity "
             f"over {r['text_tokens']} tokens of `{r['text']}` (all of it unless the command says --tokens), {r['threads']} thread{'s' if r['threads'] > 1 else ''}. "
             + _calibration(r) + " " + _machine(r),
             f"Command: `{r['command']}`.", "",
             ("| weights | group size | perplexity | vs float | relative logit error | KL mean / p99 (nats) | "
              "same top token | quantize s |"),
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        groups = str(x.get("group_size", "-"))
        fallback = [f"{g} on {k}-wide layers" for k, g in x.get("layer_group_sizes", {}).items()
                    if g != x["group_size"]]
        if fallback:
            groups += f" ({', '.join(fallback)})"
        lines.append(f"| {names.get(x['method'], x['method'])} | {groups} | {x['perplexity']:.3f} | "
                     f"{x['vs_float_pct']:+.1f}% | {x['rel_logit_error']:.3f} | {_kl(x)} | {_top1(x)} | {x['quantize_s']:.1f} |")
    types = r.get("source_types") or {}
    if types:
        lines[2] += " Quantized layers' tensors in the GGUF: " + ", ".join(f"{t} x{n}" for t, n in types.items())
        lines[2] += "."
    four_bit = {"Q4_0", "Q4_1", "Q4_K"}
    ran_32 = any(x.get("group_size") == 32 for x in r["rows"])
    if r["float_source"].startswith("GGUF") and set(types) <= four_bit:
        lines += ["", "The float weights were themselves 4-bit with groups of 32 (the GGUF), so int4 at group 32 "
                      + ("lands back on that grid exactly: its row is no test of the method."
                         if ran_32 else "would land back on that grid exactly: no test of the method, so not run.")
                      + " Groups of 64 and 128 are."]
    elif types and ran_32:
        above = sum(n for t, n in types.items() if t not in four_bit)
        lines += ["", f"{above} of the {sum(types.values())} tensors were stored above 4 bits, so group 32 is a real "
                      "rounding for them (the 4-bit ones have groups of 32 already)."]
    return "\n".join(lines)


def render_cpu_long_context(r: dict) -> str:
    m = r["machine"]
    lines = ["## Long prompts on CPU: turboinfer vs llama.cpp", "",
             f"Model `{r['model']}`, {r['threads']} threads, {m['cpu']} ({m['cores']} cores{_caches(m)}), "
             f"torch {m['torch']}, {r['date']}.", f"Command: `{r['command']}`.", "",
             f"The benchmark text repeated to N tokens, then {r['new_tokens']} greedy tokens; time to first token "
             f"(prefill + one token) and decode tok/s over the tokens after the first, each attending to the whole "
             f"prompt. Median of {r['repeats']} runs; no prefix reuse.", "",
             "| prompt tokens | TTFT s (llama.cpp) | ratio | decode tok/s (llama.cpp) | ratio |",
             "|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        ours, lc = x["turboinfer"], x["llama.cpp"]
        lines.append(f"| {x['prompt_tokens']} | {ours['ttft_s']:.2f} ({lc['ttft_s']:.2f}) | "
                     f"{lc['ttft_s'] / ours['ttft_s']:.2f}x faster | {ours['decode_tok_s']:.1f} "
                     f"({lc['decode_tok_s']:.1f}) | {ours['decode_tok_s'] / lc['decode_tok_s']:.2f}x |")
    return "\n".join(lines)


TYPE_NAMES = {"0": "F32", "2": "Q4_0", "3": "Q4_1", "8": "Q8_0", "12": "Q4_K", "13": "Q5_K", "14": "Q6_K"}


def render_cpu_gguf_types(r: dict) -> str:
    m = r["machine"]
    lines = ["## GGUF Q8_0 / Q5_K / Q6_K layers on CPU: turboinfer vs llama.cpp", "",
             f"SmolLM2-135M-Instruct re-encoded (see the command's docstring: `q8_0` = every linear layer Q8_0; "
             f"`mixed` = Q4_1 with ffn_down in Q6_K and attn_v in Q8_0), {r['threads']} threads, {m['cpu']} "
             f"({m['cores']} cores{_caches(m)}), torch {m['torch']}, {r['date']}.", f"Command: `{r['command']}`.", "",
             "Decode: 128 greedy tokens after a 16-token prompt, batch 1; prefill: 512 tokens (median of 5); "
             f"perplexity over `benchmarks/data/lighthouses.txt` ({r['text_tokens']} tokens).", "",
             "| file | tensor types | decode tok/s (llama.cpp) | ratio | prefill tok/s (llama.cpp) | ratio | "
             "perplexity: turboinfer / C decode step / float32 dequantized / llama.cpp | resident (excl. KV) / file |",
             "|---|---|---:|---:|---:|---:|---|---:|"]
    for name, v in r["results"].items():
        ours, lc = v["turboinfer"], v["llama.cpp"]
        types = ", ".join(f"{TYPE_NAMES.get(k, k)} x{n}" for k, n in v["tensor_types"].items())
        lines.append(
            f"| {name} ({v['file_bytes'] / 2**20:.0f} MiB) | {types} | {ours['decode_tok_s']:.1f} "
            f"({lc['decode_tok_s']:.1f}) | {ours['decode_tok_s'] / lc['decode_tok_s']:.2f}x | "
            f"{ours['prefill_tok_s']:.0f} ({lc['prefill_tok_s']:.0f}) | "
            f"{ours['prefill_tok_s'] / lc['prefill_tok_s']:.2f}x | {ours['perplexity']:.3f} / "
            f"{ours.get('perplexity_decode_step', float('nan')):.3f} / {v['turboinfer_float32_perplexity']:.3f} / "
            f"{lc['perplexity']:.3f} | {v['memory']['ratio_to_file_excluding_kv']:.2f}x |")
    lines += ["", "The int8 codes of Q6_K and Q5_K take a byte a weight plus a float32 scale per group (1.25 bytes "
                  "against the file's 0.82 and 0.69); Q8_0 keeps the file's size within 6%, 4-bit types their own. "
                  "Resident includes the tokenizer and the runtime, as in the default-model table."]
    return "\n".join(lines)


def render_cpu_mixed_batch(r: dict) -> str:
    lines = ["## A long prompt beside short ones on CPU (mixed prefill + decode steps)", "",
             f"Model `{r['model']}`, {r['threads']} threads. " + _machine(r), f"Command: `{r['command']}`.", "",
             "One `LLM.generate` of a long prompt and many 60-token prompts, 48 greedy tokens each; the long prompt's "
             "512-token chunks share steps with the short ones' decodes, which run the PyTorch decode attention. "
             f"Wall time, median of {r['repeats']} runs. Anchor: the same run with every decode gathered at once, "
             "padded to the longest sequence (how it ran before the length groups); the generated tokens are "
             "identical.", "",
             "| long prompt | short prompts | length groups (s) | one padded gather (s) | speed-up |",
             "|---:|---:|---:|---:|---:|"]
    for x in r["rows"]:
        lines.append(f"| {x['long_tokens']} | {x['short_prompts']} | {x['grouped_s']:.1f} | {x['padded_s']:.1f} | "
                     f"{x['padded_s'] / x['grouped_s']:.2f}x |")
    return "\n".join(lines)


RENDERERS = {"cpu_mixed_batch": render_cpu_mixed_batch, "memory_cpu": render_memory_cpu, "cpu_long_context": render_cpu_long_context, "cpu_gguf_types": render_cpu_gguf_types, "quant_quality_cpu": render_quant_quality_cpu,
             "cpu_default_model": render_cpu_default_model, "bench_latency": render_bench_latency,
             "bench_throughput": render_bench_throughput, "bench_serve": render_bench_serve}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Render BENCHMARKS.md from benchmark JSON results.")
    ap.add_argument("--results-dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--output", default=OUT)
    args = ap.parse_args(argv)
    sections = []
    for path in sorted(glob.glob(os.path.join(args.results_dir, "*.json"))):
        with open(path) as f:
            record = json.load(f)
        render = RENDERERS.get(record.get("benchmark"))
        if render:
            root = os.path.dirname(HERE)
            full = os.path.abspath(path)
            rel = os.path.relpath(full, root) if full.startswith(root + os.sep) else full
            sections.append(render(record) + f"\n\n(from `{rel}`)")
    head = ("# Benchmarks\n\nEvery table is generated by `python benchmarks/report.py` (or `turboinfer bench report`) "
            "from the JSON files in `benchmarks/results/`, each written by the command it names. Nothing here is "
            "typed by hand.\n")
    with open(args.output, "w") as f:
        f.write(head + "\n" + "\n\n".join(sections) + "\n")
    print(f"wrote {args.output} ({len(sections)} sections)")


if __name__ == "__main__":
    main()
