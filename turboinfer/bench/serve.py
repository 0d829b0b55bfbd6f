"""`turboinfer bench serve`: load-test any OpenAI-compatible endpoint with streaming /v1/completions requests.

Requests go out at a fixed concurrency (`--concurrency N`, several values for a sweep) or as a Poisson process
(`--request-rate R` requests/s, optionally capped by a concurrency). Per request, from the SSE stream: time to
first token (TTFT: request sent to the first chunk carrying text), inter-token latencies (gaps between text
chunks), time per output token after the first (TPOT) and end-to-end latency. Output tokens come from the final
`usage` chunk (`stream_options.include_usage`) when the server sends one, since a chunk may carry several
tokens; otherwise the text chunks are counted. Goodput: requests/s that met every `--slo` bound."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass, field

from turboinfer.bench.results import ratio, samples_ms, summarize_ms
from turboinfer.bench.workloads import ServeRequest, poisson_arrivals
from turboinfer.errors import InvalidRequestError

SLO_KEYS = ("ttft", "tpot", "e2e")


def parse_slo(text: str | None) -> dict[str, float]:
    """'ttft=500,tpot=50' -> {'ttft': 0.5, 'tpot': 0.05} (milliseconds in, seconds out)."""
    slo = {}
    for part in filter(None, (text or "").split(",")):
        key, _, value = part.partition("=")
        try:
            slo[key.strip()] = float(value) / 1000
        except ValueError:
            raise InvalidRequestError(f"--slo {part!r} is not NAME=MILLISECONDS") from None
        if key.strip() not in SLO_KEYS:
            raise InvalidRequestError(f"--slo key {key!r} is not one of {', '.join(SLO_KEYS)}")
    return slo


@dataclass
class RequestResult:
    ok: bool = False
    error: str = ""
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    from_usage: bool = False  # output_tokens came from the server's usage report, not from counting chunks

    @property
    def tpot(self) -> float | None:
        if self.output_tokens < 2 or self.ttft is None:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def meets(self, slo: dict[str, float]) -> bool:
        return self.ok and all(v is None or v <= slo[k] for k, v in
                               (("ttft", self.ttft), ("tpot", self.tpot), ("e2e", self.e2e)) if k in slo)


async def send_request(client, base_url: str, model: str, req: ServeRequest, extra_body: dict) -> RequestResult:
    body = {"model": model, "prompt": req.prompt, "max_tokens": req.output_len, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **extra_body}
    res = RequestResult(prompt_tokens=req.prompt_len)
    stamps: list[float] = []
    t0 = time.perf_counter()
    try:
        async with client.stream("POST", base_url + "/completions", json=body) as resp:
            if resp.status_code != 200:
                res.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return res
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = str(chunk["error"])[:300]
                    return res
                if chunk.get("usage"):
                    usage = chunk["usage"]
                    res.output_tokens = usage.get("completion_tokens") or 0
                    res.prompt_tokens = usage.get("prompt_tokens") or res.prompt_tokens
                    res.from_usage = True
                if any(c.get("text") for c in chunk.get("choices") or []):
                    stamps.append(time.perf_counter())
    except Exception as e:  # connection refused, reset, bad JSON: the request failed, the run goes on
        res.error = f"{type(e).__name__}: {e}"[:300]
        return res
    end = time.perf_counter()
    if not stamps:
        res.error = "the stream carried no text"
        return res
    res.ok, res.ttft, res.e2e = True, stamps[0] - t0, end - t0
    res.itl = [b - a for a, b in zip(stamps, stamps[1:])]
    if not res.from_usage:
        res.output_tokens = len(stamps)
    return res


async def _run_level(base_url: str, model: str, reqs: list[ServeRequest], concurrency: int | None, rate: float,
                     seed: int, extra_body: dict, desc: str, headers: dict) -> tuple[list[RequestResult], float]:
    import httpx
    from tqdm import tqdm

    arrivals = poisson_arrivals(random.Random(seed), len(reqs), rate)
    sem = asyncio.Semaphore(concurrency or len(reqs))
    limits = httpx.Limits(max_connections=concurrency or len(reqs), max_keepalive_connections=concurrency or 100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits, headers=headers) as client:
        bar = tqdm(total=len(reqs), desc=desc, unit="req", dynamic_ncols=True)
        start = time.perf_counter()

        async def one(i: int, r: ServeRequest) -> RequestResult:
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            async with sem:  # the clock of a request starts when it is sent, not when it was due
                out = await send_request(client, base_url, model, r, extra_body)
            bar.update(1)
            return out

        results = await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
        duration = time.perf_counter() - start
        bar.close()
    return list(results), duration


def level_metrics(results: list[RequestResult], duration: float, reqs: list[ServeRequest],
                  slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.ok]
    num_out = sum(r.output_tokens for r in ok)
    num_in = sum(r.prompt_tokens for r in ok)
    sources = {r.from_usage for r in ok}
    itl = [x for r in ok for x in r.itl]
    met = sum(r.meets(slo) for r in ok) if slo else None
    return {"num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
            "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": duration,
            "request_s": len(ok) / duration, "output_tok_s": num_out / duration,
            "total_tok_s": (num_in + num_out) / duration, "num_output_tokens": num_out, "num_prompt_tokens": num_in,
            "num_requested_output_tokens": sum(q.output_len for q in reqs),
            "token_count_source": "usage" if sources == {True} else "chunks" if sources == {False} else "mixed",
            "ttft_ms": summarize_ms([r.ttft for r in ok]), "tpot_ms": summarize_ms([r.tpot for r in ok]),
            "itl_ms": summarize_ms(itl), "e2e_ms": summarize_ms([r.e2e for r in ok]),
            "goodput_req_s": None if met is None else met / duration,
            "slo_attainment": None if met is None else met / max(1, len(results)),
            "samples": {"ttft": samples_ms([r.ttft for r in ok]), "tpot": samples_ms([r.tpot for r in ok]),
                        "itl": samples_ms(itl), "e2e": samples_ms([r.e2e for r in ok])}}


def first_model(base_url: str, headers: dict) -> str:
    import httpx

    try:
        resp = httpx.get(base_url + "/models", timeout=30, headers=headers)
        resp.raise_for_status()
        return resp.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise InvalidRequestError(f"cannot list models at {base_url}/models ({e}); pass --model") from None


def bench_endpoint(name: str, base_url: str, model: str | None, reqs: list[ServeRequest],
                   concurrencies: list[int | None], rate: float, seed: int, extra_body: dict, slo: dict,
                   num_warmups: int, api_key: str | None = None) -> dict:
    base_url = base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    model = model or first_model(base_url, headers)
    levels = []
    warm = [ServeRequest(reqs[0].prompt, reqs[0].prompt_len, min(4, reqs[0].output_len))] * num_warmups
    if warm:
        asyncio.run(_run_level(base_url, model, warm, 1, math.inf, seed, extra_body, f"{name} warm-up", headers))
    for c in concurrencies:
        desc = f"{name} c={c or 'inf'}" + (f" rate={rate:g}/s" if math.isfinite(rate) else "")
        results, duration = asyncio.run(_run_level(base_url, model, reqs, c, rate, seed, extra_body, desc, headers))
        m = level_metrics(results, duration, reqs, slo)
        if m["completed"] == 0:
            raise InvalidRequestError(f"every request to {base_url} failed: {'; '.join(m['errors'])}")
        levels.append({"concurrency": c, "request_rate": rate if math.isfinite(rate) else "inf", **m})
    return {"base_url": base_url, "model": model, "levels": levels}


def serve_ratios(target: dict, ref: dict) -> list[dict]:
    """Per matching level: how many times faster / higher the target is than the reference."""
    out = []
    for a, b in zip(target["levels"], ref["levels"]):
        out.append({"concurrency": a["concurrency"], "output_tok_s": ratio(a["output_tok_s"], b["output_tok_s"]),
                    "request_s": ratio(a["request_s"], b["request_s"]),
                    "ttft_p50": ratio(b["ttft_ms"]["p50"], a["ttft_ms"]["p50"]),
                    "tpot_p50": ratio(b["tpot_ms"]["p50"], a["tpot_ms"]["p50"])})
    return out


def print_serve(result: dict) -> None:
    print(f"\nServing: {result['config']['workload']} workload, {result['config']['num_prompts']} requests")
    hdr = f"{'endpoint':12} {'conc':>5} {'req/s':>7} {'out tok/s':>9} {'TTFT p50/p99 ms':>17} " \
          f"{'TPOT p50/p99 ms':>17} {'ITL p99':>8} {'E2E p50 ms':>10} {'goodput':>8} {'fail':>4}"
    print(hdr)
    for name, e in result["engines"].items():
        for lv in e["levels"]:
            t, p = lv["ttft_ms"], lv["tpot_ms"]
            good = "-" if lv["goodput_req_s"] is None else f"{lv['goodput_req_s']:.2f}"
            print(f"{name:12} {str(lv['concurrency'] or 'inf'):>5} {lv['request_s']:>7.2f} {lv['output_tok_s']:>9.1f} "
                  f"{_pair(t):>17} {_pair(p):>17} {_n(lv['itl_ms']['p99']):>8} {_n(lv['e2e_ms']['p50']):>10} "
                  f"{good:>8} {lv['failed']:>4}")
            if result["config"]["ignore_eos"] and lv["num_output_tokens"] < lv["num_requested_output_tokens"]:
                print(f"  note: {name} sent {lv['num_output_tokens']} of the {lv['num_requested_output_tokens']} "
                      "tokens asked for (it stopped early or ignored ignore_eos)")
    for name, rows in result.get("ratios", {}).items():
        for r in rows:
            print(f"vs {name} c={r['concurrency'] or 'inf'}: output tok/s {_n(r['output_tok_s'])}x, "
                  f"TTFT p50 {_n(r['ttft_p50'])}x faster, TPOT p50 {_n(r['tpot_p50'])}x faster")


def _n(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def _pair(s: dict) -> str:
    return f"{_n(s['p50'])}/{_n(s['p99'])}"


def build_workload(args) -> tuple[str, list[ServeRequest]]:
    from turboinfer.bench import workloads as wl

    rng = random.Random(args.seed)
    workload = args.workload or ("sharegpt" if args.dataset else "random")
    if args.num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be >= 1")
    out_spec = wl.LengthSpec.parse(args.output_len, "--output-len") if args.output_len else None
    if workload == "sharegpt":
        if not args.dataset:
            raise InvalidRequestError("--workload sharegpt needs --dataset PATH.json")
        tokenizer = None
        if args.tokenizer:
            from turboinfer.loader.model_loader import load_tokenizer
            from turboinfer.loader.resolve import resolve_model

            tokenizer = load_tokenizer(resolve_model(args.tokenizer))
        return workload, wl.sharegpt_workload(rng, args.num_prompts, args.dataset, out_spec, tokenizer)
    in_spec = wl.LengthSpec.parse(args.input_len, "--input-len")
    out_spec = out_spec or wl.LengthSpec(128, 128)
    if workload == "shared-prefix":
        if args.prefix_len < 1:
            raise InvalidRequestError("--prefix-len must be >= 1")
        return workload, wl.shared_prefix_workload(rng, args.num_prompts, args.prefix_len, in_spec, out_spec)
    return workload, wl.random_workload(rng, args.num_prompts, in_spec, out_spec)


def run_serve(args, compare: list[str], concurrencies: list[int]) -> dict:
    bad = [c for c in compare if c != "llama.cpp"]
    if bad:
        raise InvalidRequestError(f"bench serve --compare {bad[0]!r}: only llama.cpp has a server to compare with")
    if args.request_rate <= 0:
        raise InvalidRequestError("--request-rate must be > 0")
    workload, reqs = build_workload(args)
    levels: list[int | None] = list(concurrencies) or ([None] if math.isfinite(args.request_rate) else [1])
    slo = parse_slo(args.slo)
    extra = {"ignore_eos": True} if args.ignore_eos else {}
    engines = {args.label: bench_endpoint(args.label, args.base_url, args.model, reqs, levels, args.request_rate,
                                          args.seed, extra, slo, args.num_warmups, args.api_key)}
    ratios = {}
    if compare:
        from turboinfer.bench.compare import llama_cpp_server
        from turboinfer.config import default_num_threads
        from turboinfer.loader.model_loader import load_tokenizer
        from turboinfer.loader.resolve import resolve_model

        resolved = resolve_model(args.compare_model or args.model)
        if resolved.kind != "gguf":
            raise InvalidRequestError("--compare llama.cpp needs a GGUF: pass --compare-model PATH.gguf")
        # llama.cpp has no ignore_eos; a large negative bias on every end token has the same effect.
        lc_extra = {"logit_bias": {str(i): -1e9 for i in load_tokenizer(resolved).eos_token_ids}} \
            if args.ignore_eos else {}
        n_ctx = max(2048, 2 * max(r.prompt_len for r in reqs) + max(r.output_len for r in reqs) + 64)
        with llama_cpp_server(resolved.path, n_ctx, args.threads or default_num_threads()) as url:
            engines["llama.cpp"] = bench_endpoint("llama.cpp", url, resolved.display_name, reqs, levels,
                                                  args.request_rate, args.seed, lc_extra, slo, args.num_warmups)
            engines["llama.cpp"]["gguf"] = resolved.path
        ratios["llama.cpp"] = serve_ratios(engines[args.label], engines["llama.cpp"])
    config = {"workload": workload, "dataset": args.dataset, "num_prompts": args.num_prompts,
              "input_len": args.input_len if workload != "sharegpt" else None, "output_len": args.output_len,
              "prefix_len": args.prefix_len if workload == "shared-prefix" else None,
              "concurrency": levels, "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
              "slo_ms": {k: v * 1000 for k, v in slo.items()}, "ignore_eos": args.ignore_eos, "seed": args.seed,
              "mean_prompt_len": sum(r.prompt_len for r in reqs) / len(reqs),
              "mean_output_len": sum(r.output_len for r in reqs) / len(reqs)}
    return {"model": engines[args.label]["model"], "engines": engines, "ratios": ratios, "config": config}
