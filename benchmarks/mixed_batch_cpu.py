"""A long prompt beside many short ones on CPU: the steps that mix a prefill chunk with decodes run the PyTorch
attention, whose decode part gathers K/V from the paged cache. It gathers them a length group at a time (at most
DECODE_GATHER_TOKENS rows); the anchor, measured in the same run, is one gather of every decode padded to the
longest sequence (DECODE_GATHER_TOKENS set past any batch), which is how it ran before the groups.

    python benchmarks/mixed_batch_cpu.py [--model ALIAS_OR_PATH] [--long 6000] [--short 32] [--threads 2]
                                         [--repeats 2] [--json benchmarks/results/mixed_batch_cpu.json]

One LLM.generate call of 1 prompt of --long tokens and --short prompts of 60 tokens (benchmarks/data/lighthouses.txt,
repeated for the long one), 48 greedy tokens each, with the engine's defaults (chunked prefill of 512 tokens a
step, so the long prompt's chunks share steps with the short ones' decodes). Wall time, median of --repeats, a
fresh prefix cache each time; the generated token ids of both settings must be identical.
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
NEW_TOKENS = 48


def batch(ids: list[int], long: int, short: int) -> list[list[int]]:
    """One prompt of `long` tokens, then `short` prompts of 60 tokens each starting 20 tokens apart."""
    return [(ids * (long // len(ids) + 1))[:long]] + [ids[i * 20:i * 20 + 60] for i in range(short)]


def run(llm, prompts: list[list[int]], repeats: int) -> tuple[float, list[list[int]]]:
    from turboinfer import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    times, tokens = [], None
    for _ in range(repeats):
        llm.engine.reset_prefix_cache()
        start = time.perf_counter()
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        times.append(time.perf_counter() - start)
        tokens = [list(o.outputs[0].token_ids) for o in outs]
    return statistics.median(times), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--long", type=int, default=6000)
    ap.add_argument("--short", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "mixed_batch_cpu.json"))
    args = ap.parse_args()

    from cpu_bench import machine, write_record

    from turboinfer import LLM, SamplingParams
    from turboinfer.bench.results import versions
    from turboinfer.kernels.torch_ref import attention

    llm = LLM(args.model, num_threads=args.threads)
    ids = llm.get_tokenizer().encode(open(TEXT).read(), add_special_tokens=False)
    prompts = batch(ids, args.long, args.short)
    llm.generate([ids[:64]], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)  # warm-up
    budget = attention.DECODE_GATHER_TOKENS
    grouped_s, grouped = run(llm, prompts, args.repeats)
    attention.DECODE_GATHER_TOKENS = 1 << 62  # the anchor: every decode in one gather, padded to the longest
    try:
        padded_s, padded = run(llm, prompts, args.repeats)
    finally:
        attention.DECODE_GATHER_TOKENS = budget
    if grouped != padded:
        raise SystemExit("the grouped and the padded gather generated different tokens")
    row = {"long_tokens": args.long, "short_prompts": args.short, "new_tokens": NEW_TOKENS,
           "grouped_s": grouped_s, "padded_s": padded_s, "gather_budget_rows": budget}
    print(row, file=sys.stderr)
    write_record(args.json, {
        "benchmark": "cpu_mixed_batch", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(sys.argv), "machine": machine(), "versions": versions(),
        "model": args.model,
        "threads": args.threads, "repeats": args.repeats, "rows": [row]})


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
