"""`turboinfer bench latency`: one batch (default 1) of token-id prompts, generated to a fixed length, timed.

Figures per request: time to first token (TTFT: arrival to the first token, so it includes the whole prefill),
time per output token after the first (TPOT), inter-token latencies (ITL: the gaps a streaming user sees) and
end-to-end latency; per iteration: output tokens/s. Memory-bound decode reads every weight once per step, so
`weight bytes x decode steps/s / copy bandwidth` says how close decode runs to the machine's limit; the
bandwidth is measured in the same run with a large device-to-device copy (read + write bytes counted)."""

from __future__ import annotations

import random
import sys
import time

from turboinfer.bench.results import ratio, samples_ms, summarize_ms
from turboinfer.bench.workloads import random_token_prompts
from turboinfer.errors import InvalidRequestError


def load_llm(engine_kwargs: dict):
    from turboinfer.llm import LLM

    print(f"Loading {engine_kwargs.get('model')} ...", file=sys.stderr, flush=True)
    llm = LLM(**engine_kwargs)
    info = llm.engine.info
    print(f"Loaded {info.model} ({info.architecture}, {info.dtype}, {info.device}) in {info.load_seconds:.1f}s",
          file=sys.stderr, flush=True)
    return llm


def engine_info(llm) -> dict:
    info = llm.engine.info
    return {"model": info.model, "path": info.path, "architecture": info.architecture, "dtype": info.dtype,
            "device": info.device, "num_packed_layers": info.num_packed_layers, "load_format": llm.config.load_format,
            "max_model_len": info.max_model_len, "kv_cache_tokens": info.kv_capacity_tokens}


def special_ids(llm) -> frozenset[int]:
    tok = llm.engine.tokenizer
    return frozenset(tok.all_special_ids) | llm.engine.info.eos_token_ids


def request_metrics(starts: list[float], stamps: list[list[float]], iter_times: list[float],
                    tokens_per_iter: list[int]) -> dict:
    """Turn per-request token timestamps (seconds, one per output token) into the latency figures."""
    ttft, tpot, itl, e2e = [], [], [], []
    for t0, ts in zip(starts, stamps):
        if not ts:
            continue
        ttft.append(ts[0] - t0)
        e2e.append(ts[-1] - t0)
        if len(ts) > 1:
            tpot.append((ts[-1] - ts[0]) / (len(ts) - 1))
            itl.extend(b - a for a, b in zip(ts, ts[1:]))
    tok_s = [n / t for n, t in zip(tokens_per_iter, iter_times) if t > 0]
    mean_tpot = sum(tpot) / len(tpot) if tpot else None
    return {"ttft_ms": summarize_ms(ttft), "tpot_ms": summarize_ms(tpot), "itl_ms": summarize_ms(itl),
            "e2e_ms": summarize_ms(e2e), "output_tok_s": sum(tok_s) / len(tok_s) if tok_s else None,
            "decode_steps_s": 1 / mean_tpot if mean_tpot else None,
            "num_output_tokens": sum(tokens_per_iter), "num_requests": len(stamps),
            "samples": {"ttft": samples_ms(ttft), "tpot": samples_ms(tpot), "itl": samples_ms(itl),
                        "e2e": samples_ms(e2e)}}


def _run_batch(llm, prompts: list[list[int]], params) -> tuple[list[float], list[list[float]], float, int]:
    eng = llm.engine
    eng.reset_prefix_cache()  # every iteration pays for its whole prefill
    t0 = time.perf_counter()
    ids = [eng.add_request(p, params) for p in prompts]
    stamps: dict[str, list[float]] = {i: [] for i in ids}
    while eng.has_unfinished():
        outs = eng.step()
        now = time.perf_counter()
        for out in outs:
            ts = stamps.get(out.request_id)
            if ts is not None:
                ts.extend([now] * (len(out.outputs[0].token_ids) - len(ts)))
    end = time.perf_counter()
    return [t0] * len(ids), [stamps[i] for i in ids], end - t0, sum(len(s) for s in stamps.values())


def run_engine_latency(llm, batches: list[list[list[int]]], output_len: int, num_warmup: int,
                       detokenize: bool = True) -> dict:
    from tqdm import tqdm

    from turboinfer.sampling_params import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True, detokenize=detokenize)
    starts, stamps, times, counts = [], [], [], []
    for k, prompts in enumerate(tqdm(batches, desc="turboinfer latency", unit="iter", dynamic_ncols=True)):
        s, ts, t, n = _run_batch(llm, prompts, params)
        if k >= num_warmup:
            starts += s
            stamps += ts
            times.append(t)
            counts.append(n)
    return request_metrics(starts, stamps, times, counts)


def measure_bandwidth(device: str, num_bytes: int | None = None, iters: int = 10) -> float:
    """Device memory bandwidth in bytes/s from timing `dst.copy_(src)` (each copy reads and writes num_bytes)."""
    import torch

    cuda = device.startswith("cuda")
    num_bytes = num_bytes or (1 << 30 if cuda else 256 << 20)
    try:
        src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
    except torch.OutOfMemoryError:  # the KV pool took the rest of the GPU: a smaller copy still saturates it
        if num_bytes <= 32 << 20:
            raise
        return measure_bandwidth(device, num_bytes // 4, iters)
    for _ in range(2):
        dst.copy_(src)
    if cuda:
        torch.cuda.synchronize(device)
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        stop.record()
        torch.cuda.synchronize(device)
        seconds = start.elapsed_time(stop) / 1000
    else:
        t = time.perf_counter()
        for _ in range(iters):
            dst.copy_(src)
        seconds = time.perf_counter() - t
    del src, dst
    if cuda:
        torch.cuda.empty_cache()
    return 2 * num_bytes * iters / seconds


def run_latency(engine_kwargs: dict, batch_size: int, input_len: int, output_len: int, num_iters: int,
                num_warmup: int, compare: list[str], detokenize: bool = True, measure_bw: bool = True) -> dict:
    if input_len < 1 or output_len < 1 or batch_size < 1 or num_iters < 1 or num_warmup < 0:
        raise InvalidRequestError("--input-len, --output-len, --batch-size and --num-iters must be >= 1")
    llm = load_llm(engine_kwargs)
    info = engine_info(llm)
    if input_len + output_len > info["max_model_len"]:
        raise InvalidRequestError(f"--input-len + --output-len = {input_len + output_len} exceeds max_model_len "
                                  f"{info['max_model_len']}")
    rng = random.Random(engine_kwargs.get("seed", 0))
    vocab = llm.engine.info.vocab_size
    batches = [random_token_prompts(rng, [input_len] * batch_size, vocab, special_ids(llm))
               for _ in range(num_warmup + num_iters)]
    engines = {"turboinfer": {**info, **run_engine_latency(llm, batches, output_len, num_warmup, detokenize)}}
    ours = engines["turboinfer"]
    if measure_bw:
        bw = measure_bandwidth(info["device"])
        wb = llm.engine.info.weight_bytes
        ours["bandwidth"] = {"copy_bytes_s": bw, "weight_bytes": wb,
                             "utilization": wb * ours["decode_steps_s"] / bw if ours["decode_steps_s"] else None}
    refs = {}
    if compare:
        from turboinfer.bench import compare as cmp

        refs = cmp.run_reference_latency(compare, llm, batches, output_len, num_warmup)
        engines.update(refs)
    ratios = {name: {"ttft": ratio(r["ttft_ms"]["mean"], ours["ttft_ms"]["mean"]),
                     "tpot": ratio(r["tpot_ms"]["mean"], ours["tpot_ms"]["mean"]),
                     "output_tok_s": ratio(ours["output_tok_s"], r["output_tok_s"])} for name, r in refs.items()}
    return {"model": info["model"], "engines": engines, "ratios": ratios,
            "config": {"batch_size": batch_size, "input_len": input_len, "output_len": output_len,
                       "num_iters": num_iters, "num_iters_warmup": num_warmup, "detokenize": detokenize,
                       "engine": {k: v for k, v in engine_kwargs.items()}}}


def print_latency(result: dict) -> None:
    cfg = result["config"]
    print(f"\nLatency: batch {cfg['batch_size']}, {cfg['input_len']} prompt tokens -> {cfg['output_len']} output "
          f"tokens, {cfg['num_iters']} iterations")
    print(f"{'engine':16} {'TTFT ms':>9} {'TPOT ms':>9} {'ITL p99':>9} {'E2E ms':>9} {'out tok/s':>10}")
    for name, e in result["engines"].items():
        print(f"{name:16} {_f(e['ttft_ms']['mean'])} {_f(e['tpot_ms']['mean'])} {_f(e['itl_ms']['p99'])} "
              f"{_f(e['e2e_ms']['mean'])} {_f(e['output_tok_s'], 10)}")
    bw = result["engines"]["turboinfer"].get("bandwidth")
    if bw and bw["utilization"] is not None:
        print(f"weights {bw['weight_bytes'] / 2**20:.1f} MiB, copy bandwidth {bw['copy_bytes_s'] / 1e9:.1f} GB/s, "
              f"decode bandwidth utilisation {100 * bw['utilization']:.1f}%")
    for name, r in result["ratios"].items():
        print(f"vs {name}: TTFT {_x(r['ttft'])} faster, TPOT {_x(r['tpot'])} faster, "
              f"output tok/s {_x(r['output_tok_s'])}")


def _f(x, width: int = 9) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.2f}"


def _x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"
