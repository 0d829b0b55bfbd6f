"""Memory estimator vs measurement on CPU: peak resident memory of a fresh process that loads a model and runs a
full batch, against `turboinfer estimate`'s total for the same settings. Models: the default SmolLM2-135M GGUF
(packed 4-bit) and Qwen2-0.5B's configuration with random bf16 weights (`--load-format dummy`).

    python benchmarks/memory_bench.py [--json benchmarks/results/memory_cpu.json]

    python benchmarks/memory_bench.py --load-only   # only the load row (seconds; what tests/memory checks)

Each setting runs in its own process. The peak resident size (VmHWM) is reset once the weights are loaded, every
block of the KV pool is written once (on CPU a block becomes resident when first written; an engine that has run a
while has written them all, and the estimate counts the whole pool), and the peak is read after max_num_seqs prompts
of max_model_len / 2 tokens generated max_model_len / 4 tokens each, so the step activations have been touched. The estimate counts the model as stored in memory after loading; the
extra peak while a GGUF file is read and unpacked during loading is reported separately.

The load row (`load` in the JSON) checks the bar "resident memory after loading the default GGUF <= 1.3x the file
size plus the KV pool". A fresh process reads VmRSS and /proc/self/smaps_rollup right after `import torch,
tokenizers, turboinfer` (the interpreter and the engine's libraries are not the model: importing tokenizers alone
maps ~5 MiB of its code, whatever the model), then after `LLM(...)` returns:
    load_rss_ratio  = (VmRSS after - VmRSS before - resident KV pool bytes) / file size
    load_anon_ratio = the same with anonymous memory only, i.e. without the pages of shared libraries (torch,
                      tokenizers) that loading runs for the first time; no file is mapped after loading
and the loading peak is VmHWM (reset to VmRSS at the first reading) minus VmRSS before. The resident part of the KV
pool is read with mincore (`ModelRunner.kv_cache_resident_bytes`); right after loading nothing has written it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

HERE = os.path.dirname(os.path.abspath(__file__))
SETTINGS = [  # (model, max_model_len, max_num_seqs, kv_cache_dtype, dtype)
    ("smollm2-135m-instruct", 512, 1, "auto", "auto"),
    ("smollm2-135m-instruct", 512, 4, "auto", "auto"),
    ("smollm2-135m-instruct", 2048, 4, "auto", "auto"),
    ("smollm2-135m-instruct", 1024, 16, "auto", "auto"),
    ("smollm2-135m-instruct", 1024, 4, "int8", "float32"),
    ("qwen2-0.5b-shape", 1024, 4, "auto", "auto"),
    ("qwen2-0.5b-shape", 2048, 8, "int8", "auto"),
]
# Qwen2-0.5B's configuration (random weights via --load-format dummy): a second architecture and size, no download.
QWEN2_05B = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 151936,
             "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
             "bos_token_id": 151643, "eos_token_id": 151645}

PROBE = r"""
import json, sys
from turboinfer import LLM, SamplingParams
model, max_len, seqs, kv, dtype = sys.argv[5], int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
fmt = "dummy" if model.endswith(".json") else "auto"
llm = LLM(model, max_model_len=max_len, max_num_seqs=seqs, kv_cache_dtype=kv, dtype=dtype, load_format=fmt)
def hwm():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')).split()[1]) * 1024
after_load = hwm()
open('/proc/self/clear_refs', 'w').write('5')  # reset the peak: loading's transient is reported apart
for group in llm.engine.executor.worker.runner.kv_caches:  # every block written once, as in an engine that has run a while
    for t in group:
        if t is not None:
            t.zero_()
prompts = [[100 + (i * 7 + j) % 4000 for j in range(max_len // 2)] for i in range(seqs)]
llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_len // 4, ignore_eos=True), use_tqdm=False)
peak = hwm()
from turboinfer.runner.worker import model_weight_bytes
from turboinfer import memory
w, cfg = llm.engine.executor.worker, llm.config
est = memory.estimate_inference(w.arch, dtype=str(w.dtype).replace("torch.", ""), kv_cache_dtype=kv,
    max_model_len=w.max_model_len, max_num_seqs=seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
    block_size=cfg.block_size, device="cpu", num_kv_blocks=w.num_blocks, weight_bytes=model_weight_bytes(w.runner.model))
print(json.dumps({"peak_rss": peak, "peak_rss_after_load": after_load, "estimate": est.total,
                  "kv_bytes": llm.engine.executor.worker.runner.kv_cache_bytes(), "kv_estimate": est.kv_cache,
                  "dtype": str(w.dtype).replace("torch.", "")}))
"""

BASELINE = "import torch, tokenizers, turboinfer"  # what the load probe imports before its first reading
LOAD_PROBE = r"""
import json, os, sys
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
def anon_file():
    kb = {l.split()[0]: int(l.split()[1]) * 1024 for l in open('/proc/self/smaps_rollup') if l.endswith('kB\n')}
    return kb['Anonymous:'], kb['Rss:'] - kb['Anonymous:']
%s
torch.set_num_threads(1)
rss0, (anon0, file0) = status('VmRSS'), anon_file()
open('/proc/self/clear_refs', 'w').write('5')  # VmHWM := VmRSS: the peak read below is loading's
from turboinfer import LLM
llm = LLM(sys.argv[1], max_model_len=512, max_num_seqs=1, num_threads=1)
rss1, peak, (anon1, file1) = status('VmRSS'), status('VmHWM'), anon_file()
from turboinfer.runner.worker import model_weight_bytes
w = llm.engine.executor.worker
print(json.dumps({"rss_before": rss0, "rss_after_load": rss1, "anon_increase": anon1 - anon0,
                  "file_backed_increase": file1 - file0, "peak_rss_during_load": peak, "peak_increase": peak - rss0,
                  "kv_bytes": llm.engine.executor.worker.runner.kv_cache_bytes(), "kv_resident": llm.engine.executor.worker.runner.kv_cache_resident_bytes(),
                  "weight_bytes": model_weight_bytes(w.runner.model),
                  "file_bytes": os.path.getsize(w.resolved.path), "load_seconds": w.load_seconds,
                  "model_file_mapped": any(os.path.realpath(w.resolved.path) in l for l in open('/proc/self/maps'))}))
"""


def measure_load(model: str = "smollm2-135m-instruct") -> dict:
    """The load row: resident memory a fresh process gains by loading `model` (see the module docstring)."""
    out = subprocess.run([sys.executable, "-c", LOAD_PROBE % BASELINE, model], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    rest = r["rss_after_load"] - r["rss_before"] - r["kv_resident"]
    r.update(model=model, baseline=BASELINE, max_model_len=512, max_num_seqs=1, threads=1,
             load_rss_ratio=rest / r["file_bytes"],
             load_anon_ratio=(r["anon_increase"] - r["kv_resident"]) / r["file_bytes"])
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "memory_cpu.json"))
    ap.add_argument("--load-only", action="store_true", help="only the default model's load row")
    args = ap.parse_args()
    import tempfile

    load = measure_load()
    print({"load": load}, file=sys.stderr)
    rows = []
    tmp = tempfile.mkdtemp()
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(QWEN2_05B, f)
    for name, max_len, seqs, kv, dtype in [] if args.load_only else SETTINGS:
        model = os.path.join(tmp, "config.json") if name == "qwen2-0.5b-shape" else name
        out = subprocess.run([sys.executable, "-c", PROBE, str(max_len), str(seqs), kv, dtype, model],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r.update(model=name, max_model_len=max_len, max_num_seqs=seqs, kv_cache_dtype=kv)
        r["ratio"] = r["peak_rss"] / r["estimate"]
        print(r, file=sys.stderr)
        rows.append(r)
    from cpu_bench import machine

    record = {"benchmark": "memory_cpu", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python " + " ".join(sys.argv), "machine": machine(),
              "load": load, "rows": rows}
    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(record, f, indent=2)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
