"""Time of one C decode step of the default model against context length (2 threads).

    python benchmarks/cpu_decode_context.py [--model smollm2-135m-instruct] [--threads 2]

Calls the engine's CPU decoder directly for one sequence whose block table covers the context (the cache is
written with zeros first, so every page is its own memory; attention reads every position whatever it holds), 100
steps per length, and prints the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

CONTEXTS = (16, 512, 1024, 2048, 4000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    from turboinfer import LLM

    llm = LLM(args.model, num_threads=args.threads, max_model_len=4096, kv_cache_memory="256MiB")
    decoder = llm.engine.executor.worker.runner.cpu_decoder
    if decoder is None:
        raise SystemExit("this model does not run on the C decode step (see docs/cpu_decode.md)")
    blocks = llm.engine.kv.allocate("bench", max(CONTEXTS) + 1)
    for group in llm.engine.executor.worker.runner.kv_caches:  # on CPU the pool gets memory as it is written: write all of it
        for t in group:
            if t is not None:
                t.zero_()
    print("| context | " + " | ".join(f"{c:,}" for c in CONTEXTS) + " |")
    row = []
    for ctx in CONTEXTS:
        times = []
        for _ in range(100):
            t = time.perf_counter()
            decoder([7], [ctx], [blocks])
            times.append(time.perf_counter() - t)
        row.append(statistics.median(times) * 1e3)
    print("| ms per token | " + " | ".join(f"{ms:.1f}" for ms in row) + " |")


if __name__ == "__main__":
    main()
