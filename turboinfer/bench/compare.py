"""Reference engines run in the same process on the same model and the same prompts: HF transformers
(`--compare hf`: the same checkpoint; a GGUF is dequantized through `gguf_file`) and llama.cpp
(`--compare llama.cpp`: llama-cpp-python on the same GGUF). For `bench serve`, llama.cpp's OpenAI-compatible
server (`python -m llama_cpp.server`) is started on 127.0.0.1 and stopped afterwards.

Each reference computes the same dtype on the same device with the same thread count as turboinfer, greedy,
with end-of-sequence ignored so every engine generates exactly the requested tokens."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

from turboinfer.errors import InvalidRequestError

ENGINES = ("hf", "llama.cpp")
NAMES = {"hf": "transformers", "llama.cpp": "llama.cpp"}


def _threads(llm) -> int:
    from turboinfer.config import default_num_threads

    return llm.config.num_threads or default_num_threads()


def load_hf(llm):
    """The same checkpoint in HF transformers (random weights with --load-format dummy)."""
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    info = llm.engine.info
    path, dtype = info.path, getattr(torch, info.dtype)
    if info.device == "cpu":
        torch.set_num_threads(_threads(llm))
    if llm.config.load_format == "dummy":
        if info.model_format == "gguf":
            from turboinfer.loader.gguf_file import GGUFFile

            cfg = GGUFFile(path).hf_config()
        else:
            from turboinfer.loader.model_loader import read_hf_config

            cfg = read_hf_config(path)
        cfg = {k: v for k, v in cfg.items() if k not in ("torch_dtype", "dtype", "transformers_version")}
        config = transformers.AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    elif info.model_format == "gguf":
        d, name = os.path.split(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(info.device).eval()


class _StepClock:
    """A transformers streamer that only records when each generation step's tokens exist."""

    def __init__(self, cuda: bool) -> None:
        self.cuda, self.times, self.calls = cuda, [], 0

    def put(self, value) -> None:
        self.calls += 1
        if self.calls > 1:  # the first call hands over the prompt
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def _hf_generate(model, prompts: list[list[int]], max_new: int, pad_id: int, clock=None) -> None:
    """Greedy generation of exactly max_new tokens per row; ragged prompts are left-padded."""
    import torch

    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                       do_sample=False, pad_token_id=pad_id, streamer=clock)


def _pad_id(llm) -> int:
    tok = llm.engine.tokenizer
    return tok.pad_token_id if tok.pad_token_id is not None else 0


# Loads the model and evaluates a few tokens in a child process: a llama.cpp build that crashes on this machine
# (llama.cpp's AMX kernels take a segfault on some virtualized Xeons, ggml-org/llama.cpp#20824) kills that child
# instead of the benchmark.
_PROBE = """
import sys
from llama_cpp import Llama
m = Llama(sys.argv[1], n_ctx=64, n_batch=64, n_threads=int(sys.argv[2]), n_threads_batch=int(sys.argv[2]),
          verbose=False, n_gpu_layers=0)
m.eval(m.tokenize(b"The capital of France is"))
"""
_probed: set[tuple[str, int]] = set()


def check_llama_cpp(gguf_path: str, threads: int, timeout_s: float = 300.0) -> None:
    """Raise InvalidRequestError when llama-cpp-python cannot load `gguf_path` and evaluate a prompt on this
    machine (checked once per path and thread count, in a child process)."""
    if (gguf_path, threads) in _probed:
        return
    try:
        proc = subprocess.run([sys.executable, "-c", _PROBE, gguf_path, str(threads)], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise InvalidRequestError(f"llama.cpp did not evaluate a 6-token prompt of {gguf_path} within "
                                  f"{timeout_s:.0f}s") from None
    if proc.returncode < 0:
        sig = signal.Signals(-proc.returncode).name
        raise InvalidRequestError(
            f"llama.cpp (llama-cpp-python) crashed with {sig} evaluating {gguf_path} on this machine. Its AMX "
            "kernels are known to crash on some virtualized Xeons; a build without them: CMAKE_ARGS='-DGGML_NATIVE=OFF "
            "-DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
            "-DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_AMX_TILE=OFF' pip install --force-reinstall --no-deps "
            "--no-cache-dir llama-cpp-python")
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise InvalidRequestError(f"llama.cpp could not run {gguf_path}: {tail[0]}")
    _probed.add((gguf_path, threads))


def load_llama_cpp(llm, n_ctx: int):
    from llama_cpp import Llama

    info = llm.engine.info
    if info.model_format != "gguf":
        raise InvalidRequestError("--compare llama.cpp needs a GGUF model file")
    t = _threads(llm)
    check_llama_cpp(info.path, t)
    return Llama(info.path, n_ctx=n_ctx, n_batch=512, n_threads=t, n_threads_batch=t, verbose=False,
                 n_gpu_layers=-1 if info.device.startswith("cuda") else 0)


def _llama_cpp_stamps(lc, prompt: list[int], n: int) -> list[float]:
    lc.reset()  # no KV reuse from the previous prompt
    stamps = []
    for _ in lc.generate(prompt, temp=0.0, reset=True):  # generate() never stops at EOS by itself
        stamps.append(time.perf_counter())
        if len(stamps) == n:
            break
    return stamps


def _check(compare: list[str]) -> None:
    bad = [c for c in compare if c not in ENGINES]
    if bad:
        raise InvalidRequestError(f"--compare {bad[0]!r} is not one of {', '.join(ENGINES)}")


def run_reference_latency(compare: list[str], llm, batches: list[list[list[int]]], output_len: int,
                          num_warmup: int) -> dict:
    from tqdm import tqdm

    from turboinfer.bench.latency import request_metrics

    _check(compare)
    out = {}
    for engine in compare:
        if engine == "llama.cpp" and len(batches[0]) > 1:
            print("llama.cpp (llama-cpp-python) decodes one sequence at a time: skipped for --batch-size > 1",
                  file=sys.stderr)
            continue
        starts, stamps, times, counts = [], [], [], []
        if engine == "hf":
            model, pad = load_hf(llm), _pad_id(llm)
        else:
            model = load_llama_cpp(llm, len(batches[0][0]) + output_len + 8)
        for k, prompts in enumerate(tqdm(batches, desc=f"{NAMES[engine]} latency", unit="iter", dynamic_ncols=True)):
            t0 = time.perf_counter()
            if engine == "hf":
                clock = _StepClock(model.device.type == "cuda")
                _hf_generate(model, prompts, output_len, pad, clock)
                ts = [clock.times] * len(prompts)
            else:
                ts = [_llama_cpp_stamps(model, prompts[0], output_len)]
            if k >= num_warmup:
                starts += [t0] * len(prompts)
                stamps += ts
                times.append(time.perf_counter() - t0)
                counts.append(sum(len(s) for s in ts))
        out[NAMES[engine]] = {"engine": NAMES[engine], **request_metrics(starts, stamps, times, counts)}
        del model
    return out


def run_reference_throughput(compare: list[str], llm, prompts: list[list[int]], output_lens: list[int],
                             hf_batch_size: int) -> dict:
    """Offline throughput of the references. HF runs fixed batches of `hf_batch_size` prompts (left-padded,
    every row generating the batch's longest requested output); llama-cpp-python one prompt after another.
    Only the requested tokens count as output, as for turboinfer."""
    from tqdm import tqdm

    _check(compare)
    out = {}
    num_prompt = sum(len(p) for p in prompts)
    num_output = sum(output_lens)
    for engine in compare:
        if engine == "hf":
            model, pad = load_hf(llm), _pad_id(llm)
            _hf_generate(model, prompts[:1], 2, pad)  # warm-up
            bar = tqdm(total=len(prompts), desc="transformers throughput", unit="prompt", dynamic_ncols=True)
            t0 = time.perf_counter()
            generated = 0
            for i in range(0, len(prompts), hf_batch_size):
                chunk, lens = prompts[i:i + hf_batch_size], output_lens[i:i + hf_batch_size]
                _hf_generate(model, chunk, max(lens), pad)
                generated += len(chunk) * max(lens)
                bar.update(len(chunk))
        else:
            model = load_llama_cpp(llm, max(len(p) for p in prompts) + max(output_lens) + 8)
            _llama_cpp_stamps(model, prompts[0][:8], 2)  # warm-up
            bar = tqdm(total=len(prompts), desc="llama.cpp throughput", unit="prompt", dynamic_ncols=True)
            t0 = time.perf_counter()
            generated = 0
            for p, n in zip(prompts, output_lens):
                generated += len(_llama_cpp_stamps(model, p, n))
                bar.update(1)
        elapsed = time.perf_counter() - t0
        bar.close()
        out[NAMES[engine]] = {"engine": NAMES[engine], "elapsed_s": elapsed, "num_requests": len(prompts),
                              "num_prompt_tokens": num_prompt, "num_output_tokens": num_output,
                              "num_generated_tokens": generated, "request_s": len(prompts) / elapsed,
                              "output_tok_s": num_output / elapsed, "total_tok_s": (num_prompt + num_output) / elapsed}
        if engine == "hf":
            out[NAMES[engine]]["batch_size"] = hf_batch_size
        del model
    return out


# ---- llama.cpp's HTTP server, for bench serve ------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def llama_cpp_server(gguf_path: str, n_ctx: int, threads: int, timeout_s: float = 180.0):
    """Start `python -m llama_cpp.server` on a free 127.0.0.1 port; yield its base URL; stop it afterwards."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError as e:
        raise InvalidRequestError(f"--compare llama.cpp needs llama-cpp-python's server extras ({e}); "
                                  "pip install 'turboinfer[bench]'") from None
    check_llama_cpp(gguf_path, threads)
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf_path, "--host", "127.0.0.1", "--port", str(port),
           "--n_ctx", str(n_ctx), "--n_threads", str(threads), "--n_threads_batch", str(threads), "--verbose", "False",
           "--interrupt_requests", "False"]  # by default a new request cuts off the one streaming
    url = f"http://127.0.0.1:{port}/v1"
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_ready(proc, url, log, timeout_s)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_ready(proc: subprocess.Popen, url: str, log, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            tail = log.read()[-2000:]
            why = f"exited with {proc.returncode}" if proc.returncode is not None else \
                f"did not answer within {timeout_s:.0f}s"
            raise InvalidRequestError(f"llama.cpp server {why}:\n{tail}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
