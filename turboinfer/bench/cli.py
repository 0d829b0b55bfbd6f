"""`turboinfer bench latency|throughput|serve|report`: flags, dispatch, JSON and plot output.

Engine flags of latency/throughput are generated from EngineConfig (so `--load-format dummy`, `--dtype`,
`--max-num-seqs` ... work as everywhere else); `--seed` seeds the engine and the workload."""

from __future__ import annotations

import argparse
import math
import os
import sys

from turboinfer.errors import InvalidRequestError


def _compare_list(values: list[str] | None) -> list[str]:
    out = []
    for v in values or []:
        out += [x.strip() for x in v.split(",") if x.strip()]
    return list(dict.fromkeys(out))


def _concurrency_list(values: list[str] | None) -> list[int]:
    out = []
    for v in values or []:
        for x in filter(None, v.split(",")):
            try:
                n = int(x)
            except ValueError:
                raise InvalidRequestError(f"--concurrency {x!r} is not an integer") from None
            if n < 1:
                raise InvalidRequestError("--concurrency must be >= 1")
            out.append(n)
    return out


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", default=None, metavar="PATH", help="write the result record (machine, versions, "
                   "command, date, every figure) to this JSON file")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="draw latency CDFs (and throughput vs "
                   "concurrency for several --concurrency values) with matplotlib")


def add_parser(subparsers) -> argparse.ArgumentParser:
    from turboinfer.config import EngineConfig, add_cli_args

    bench = subparsers.add_parser("bench", help="measure latency, throughput and serving performance",
                                  description="Benchmarks; each writes a JSON record with --json.")
    sub = bench.add_subparsers(dest="bench_command", required=True)

    p = sub.add_parser("latency", help="batch-1 (or --batch-size) TTFT, TPOT, tokens/s, bandwidth utilisation")
    add_cli_args(p, EngineConfig)
    p.add_argument("--batch-size", type=int, default=1, help="prompts generated together (default: 1)")
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens, EOS ignored (default: 128)")
    p.add_argument("--num-iters", type=int, default=5, help="measured iterations (default: 5)")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="unmeasured first iterations (default: 1)")
    p.add_argument("--bandwidth", action=argparse.BooleanOptionalAction, default=True,
                   help="measure copy bandwidth and report decode bandwidth utilisation")
    _common_offline(p)

    p = sub.add_parser("throughput", help="offline throughput of N prompts with seeded length distributions")
    add_cli_args(p, EngineConfig)
    p.add_argument("--num-prompts", type=int, default=64, help="requests (default: 64)")
    p.add_argument("--input-len", default="32:256", help="prompt tokens: N or LOW:HIGH uniform (default: 32:256)")
    p.add_argument("--output-len", default="32:256", help="output tokens: N or LOW:HIGH uniform (default: 32:256)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="generate exactly the drawn output lengths (default: on)")
    p.add_argument("--hf-batch-size", type=int, default=16, help="batch size of the HF transformers reference")
    _common_offline(p)

    p = sub.add_parser("serve", help="load-test an OpenAI-compatible endpoint (ours or another)")
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", default=None, help="model name sent in requests (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token for the endpoint "
                   "(default: $OPENAI_API_KEY)")
    p.add_argument("--workload", choices=("random", "shared-prefix", "sharegpt"), default=None,
                   help="random words (default), a shared prefix plus random words, or --dataset")
    p.add_argument("--dataset", default=None, metavar="PATH.json", help="ShareGPT-format conversations")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per concurrency level (default: 64)")
    p.add_argument("--input-len", default="128", help="prompt words ~ tokens: N or LOW:HIGH (default: 128)")
    p.add_argument("--output-len", default=None, help="max_tokens: N or LOW:HIGH (default: 128; for --dataset, "
                   "the recorded reply's length)")
    p.add_argument("--prefix-len", type=int, default=512, help="shared-prefix words (default: 512)")
    p.add_argument("--tokenizer", default=None, help="model whose tokenizer estimates dataset prompt lengths")
    p.add_argument("--concurrency", action="append", default=None, metavar="N[,N...]",
                   help="requests in flight; several values run a sweep (default: 1, or uncapped with --request-rate)")
    p.add_argument("--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: inf)")
    p.add_argument("--slo", default=None, metavar="ttft=MS,tpot=MS,e2e=MS", help="bounds for goodput")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="ask for exactly max_tokens (sends ignore_eos; for llama.cpp, an EOS logit bias)")
    p.add_argument("--num-warmups", type=int, default=1, help="short requests sent before measuring")
    p.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    p.add_argument("--compare", action="append", default=None, help="llama.cpp: also start llama-cpp-python's "
                   "server on the same GGUF and run the same workload against it")
    p.add_argument("--compare-model", default=None, help="GGUF for --compare llama.cpp (default: --model, "
                   "resolved as a local file or alias)")
    p.add_argument("--threads", type=int, default=None, help="llama.cpp server threads (default: all cores)")
    p.add_argument("--label", default="target", help="name of the endpoint in tables and plots")
    _output_flags(p)

    p = sub.add_parser("report", help="regenerate BENCHMARKS.md from the stored JSON results")
    p.add_argument("--results-dir", default=None, help="default: benchmarks/results of the checkout")
    p.add_argument("--output", default=None, help="default: BENCHMARKS.md of the checkout")
    return bench


def _common_offline(p: argparse.ArgumentParser) -> None:
    p.add_argument("--compare", action="append", default=None, metavar="hf|llama.cpp",
                   help="also run HF transformers and/or llama.cpp on the same model and print ratios (repeatable)")
    p.add_argument("--detokenize", action=argparse.BooleanOptionalAction, default=True,
                   help="detokenize outputs as users get them (default: on)")
    _output_flags(p)


def _engine_kwargs(args) -> dict:
    from dataclasses import fields

    from turboinfer.config import EngineConfig

    return {f.name: getattr(args, f.name) for f in fields(EngineConfig) if hasattr(args, f.name)}


def run(args) -> int:
    from turboinfer.bench import results as res

    cmd = args.bench_command
    if cmd == "report":
        return run_report(args.results_dir, args.output)
    argv = getattr(args, "bench_argv", None)
    if cmd == "latency":
        from turboinfer.bench.latency import print_latency, run_latency

        out = run_latency(_engine_kwargs(args), args.batch_size, args.input_len, args.output_len, args.num_iters,
                          args.num_iters_warmup, _compare_list(args.compare), args.detokenize, args.bandwidth)
        print_latency(out)
    elif cmd == "throughput":
        from turboinfer.bench.throughput import print_throughput, run_throughput
        from turboinfer.bench.workloads import LengthSpec

        out = run_throughput(_engine_kwargs(args), args.num_prompts, LengthSpec.parse(args.input_len, "--input-len"),
                             LengthSpec.parse(args.output_len, "--output-len"), args.ignore_eos,
                             _compare_list(args.compare), args.hf_batch_size, args.detokenize)
        print_throughput(out)
    else:
        from turboinfer.bench.serve import print_serve, run_serve

        out = run_serve(args, _compare_list(args.compare), _concurrency_list(args.concurrency))
        print_serve(out)
    record = res.make_record(f"bench_{cmd}", argv, out.pop("config"), out.pop("engines"), **out)
    if args.json:
        res.write_json(record, args.json)
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        res.plot_record(record, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def run_report(results_dir: str | None, output: str | None) -> int:
    import importlib.util

    import turboinfer

    root = os.path.dirname(os.path.dirname(os.path.abspath(turboinfer.__file__)))
    script = os.path.join(root, "benchmarks", "report.py")
    if not os.path.isfile(script):
        raise InvalidRequestError(f"{script} not found: `bench report` runs from a source checkout")
    spec = importlib.util.spec_from_file_location("turboinfer_benchmarks_report", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    argv = (["--results-dir", results_dir] if results_dir else []) + (["--output", output] if output else [])
    mod.main(argv)
    return 0


def main(argv: list[str]) -> int:
    """`turboinfer bench ARGV...` in-process, recording ARGV as the command in the result."""
    from turboinfer.cli import build_parser

    args = build_parser().parse_args(["bench", *argv])
    args.bench_argv = list(argv)
    return run(args)
