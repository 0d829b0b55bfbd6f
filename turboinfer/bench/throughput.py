"""`turboinfer bench throughput`: offline batch inference. N token-id prompts with seeded input and output
lengths (fixed or uniform ranges) go to `LLM.generate` at once; the engine batches them continuously.
Figures: requests/s, output tokens/s, and total (prompt + output) tokens/s over the wall time of the run."""

from __future__ import annotations

import random

from turboinfer.bench.latency import engine_info, load_llm, special_ids
from turboinfer.bench.results import ratio, samples_ms, summarize_ms
from turboinfer.bench.workloads import LengthSpec, random_token_prompts
from turboinfer.errors import InvalidRequestError


def run_throughput(engine_kwargs: dict, num_prompts: int, input_len: LengthSpec, output_len: LengthSpec,
                   ignore_eos: bool, compare: list[str], hf_batch_size: int = 16, detokenize: bool = True) -> dict:
    import time

    from turboinfer.sampling_params import SamplingParams

    if num_prompts < 1:
        raise InvalidRequestError("--num-prompts must be >= 1")
    llm = load_llm(engine_kwargs)
    info = engine_info(llm)
    if input_len.high + output_len.high > info["max_model_len"]:
        raise InvalidRequestError(f"the longest request ({input_len.high} prompt + {output_len.high} output tokens) "
                                  f"exceeds max_model_len {info['max_model_len']}")
    rng = random.Random(engine_kwargs.get("seed", 0))
    in_lens, out_lens = input_len.sample(rng, num_prompts), output_len.sample(rng, num_prompts)
    vocab = llm.engine.info.vocab_size
    prompts = random_token_prompts(rng, in_lens, vocab, special_ids(llm))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=ignore_eos, detokenize=detokenize)
              for n in out_lens]

    warm = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    llm.generate([prompts[0][:8]], warm, use_tqdm=False)  # first-call costs (allocator, kernels) stay out
    llm.engine.reset_prefix_cache()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0

    num_in = sum(in_lens)
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    e2e = [o.metrics["finished_time"] - o.metrics["arrival_time"] for o in outs]
    ttft = [o.metrics["first_token_time"] - o.metrics["arrival_time"] for o in outs]
    stats = llm.engine.stats()
    ours = {**info, "elapsed_s": elapsed, "num_requests": num_prompts, "num_prompt_tokens": num_in,
            "num_output_tokens": num_out, "num_requested_output_tokens": sum(out_lens),
            "request_s": num_prompts / elapsed, "output_tok_s": num_out / elapsed,
            "total_tok_s": (num_in + num_out) / elapsed, "num_preemptions": stats["num_preemptions"],
            "ttft_ms": summarize_ms(ttft), "e2e_ms": summarize_ms(e2e),
            "samples": {"ttft": samples_ms(ttft), "e2e": samples_ms(e2e)}}
    engines = {"turboinfer": ours}
    refs = {}
    if compare:
        from turboinfer.bench import compare as cmp

        del outs
        refs = cmp.run_reference_throughput(compare, llm, prompts, out_lens, hf_batch_size)
        engines.update(refs)
    ratios = {name: {"output_tok_s": ratio(ours["output_tok_s"], r["output_tok_s"]),
                     "total_tok_s": ratio(ours["total_tok_s"], r["total_tok_s"])} for name, r in refs.items()}
    cfg = {"num_prompts": num_prompts, "input_len": str(input_len), "output_len": str(output_len),
           "ignore_eos": ignore_eos, "detokenize": detokenize, "hf_batch_size": hf_batch_size,
           "engine": dict(engine_kwargs)}
    return {"model": info["model"], "engines": engines, "ratios": ratios, "config": cfg}


def print_throughput(result: dict) -> None:
    cfg = result["config"]
    print(f"\nThroughput: {cfg['num_prompts']} prompts, input {cfg['input_len']}, output {cfg['output_len']} tokens"
          f"{', EOS ignored' if cfg['ignore_eos'] else ''}")
    print(f"{'engine':16} {'seconds':>9} {'req/s':>9} {'out tok/s':>10} {'total tok/s':>12}")
    for name, e in result["engines"].items():
        print(f"{name:16} {e['elapsed_s']:>9.2f} {e['request_s']:>9.2f} {e['output_tok_s']:>10.1f} "
              f"{e['total_tok_s']:>12.1f}")
    for name, r in result["ratios"].items():
        print(f"vs {name}: output tok/s {r['output_tok_s']:.2f}x, total tok/s {r['total_tok_s']:.2f}x")
