"""The default model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI) end to end: API, CLI, reference parity."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from turboinfer import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8)


@pytest.fixture(scope="module")
def llm(default_model_path):
    return LLM(default_model_path, max_model_len=1024, kv_cache_memory="128MiB")


def test_capital_of_france(llm):
    out = llm.generate("The capital of France is", GREEDY, use_tqdm=False)[0]
    assert out.outputs[0].text.startswith(" Paris"), out.outputs[0].text


def test_chat_template_reply(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert "Paris" in out.outputs[0].text
    assert out.outputs[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def llm_f32(default_model_path):
    return LLM(default_model_path, dtype="float32", dequantize_gguf=True, max_model_len=1024,
               kv_cache_memory="64MiB")


TEXT = ("Lighthouses guided ships along dangerous coasts for centuries. Their keepers trimmed the wicks, "
        "wound the clockwork and polished the great lenses, night after night, until electricity made them "
        "automatic.")


def test_logits_match_transformers_gguf_loader(llm_f32, default_model_path):
    """transformers dequantizes the same GGUF with the gguf package; float32 logits must agree."""
    from transformers import AutoModelForCausalLM

    from tiny_models import full_logits

    d, name = os.path.split(default_model_path)
    hf = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    ids = llm_f32.get_tokenizer().encode(TEXT)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].float()
    ours = full_logits(llm_f32, ids)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_packed_path_tracks_dequantized_path(llm, llm_f32):
    """Packed 4-bit weights with bfloat16 activations vs exact float32 dequantized weights: the weights are the
    same numbers (the conversion is lossless), only activation rounding differs. Over the benchmark text the
    perplexities must agree within 0.5% (mean log-likelihood within 0.005 nats) and the top token mostly."""
    from tiny_models import full_logits

    assert llm.engine.executor.worker.num_packed_layers == 30 * 4  # qkv, o, gate_up, down in every layer
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data", "lighthouses.txt")).read()
    ids = llm.get_tokenizer().encode(text)[:1000]
    packed, exact = full_logits(llm, ids), full_logits(llm_f32, ids)
    target = torch.tensor(ids[1:])[:, None]
    lp_p = packed.log_softmax(-1)[:-1].gather(-1, target)
    lp_e = exact.log_softmax(-1)[:-1].gather(-1, target)
    assert abs((lp_p - lp_e).mean()) < 0.005
    assert (packed.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95


def test_c_decode_step_tracks_dequantized_path(llm, llm_f32):
    """The C decode step (float32 activations, bf16 KV cache, packed weights) against exact float32 weights over
    400 positions: the same bar as the packed PyTorch path above."""
    assert llm.engine.executor.worker.runner.cpu_decoder is not None
    text = open(os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "data", "lighthouses.txt")).read()
    ids = llm.get_tokenizer().encode(text)[:400]
    from tiny_models import full_logits

    from turboinfer.bench.probe import teacher_forced_logits

    fast, exact = teacher_forced_logits(llm, ids), full_logits(llm_f32, ids)
    target = torch.tensor(ids[1:])[:, None]
    lp_f = fast.log_softmax(-1)[:-1].gather(-1, target)
    lp_e = exact.log_softmax(-1)[:-1].gather(-1, target)
    assert abs((lp_f - lp_e).mean()) < 0.005
    assert (fast.argmax(-1) == exact.argmax(-1)).float().mean() > 0.95


def run_cli(*args, stdin: str | None = None, timeout: int = 300):
    return subprocess.run([sys.executable, "-m", "turboinfer", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_cli_generate_streams_completion(default_model_path):
    r = run_cli("generate", "The capital of France is", "--model", default_model_path, "--temperature", "0",
                "--max-tokens", "6", "--kv-cache-memory", "64MiB")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(" Paris")


def test_cli_chat_multi_turn(default_model_path):
    r = run_cli("chat", "--model", default_model_path, "--temperature", "0", "--max-tokens", "12",
                "--kv-cache-memory", "64MiB", stdin="What is the capital of France?\n/reset\nSay hello.\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert "conversation cleared" in r.stderr


def test_cli_chat_refuses_a_model_without_chat_template(tmp_path_factory):
    """A base model (gemma3-270m ships none) gets one clear error before the prompt, naming the command to use."""
    from tiny_models import make_tiny_model

    path, _ = make_tiny_model(tmp_path_factory, "llama-mqa")
    cfg_path = os.path.join(path, "tokenizer_config.json")
    cfg = json.load(open(cfg_path))
    cfg.pop("chat_template", None)
    json.dump(cfg, open(cfg_path, "w"))
    if os.path.exists(os.path.join(path, "chat_template.jinja")):
        os.unlink(os.path.join(path, "chat_template.jinja"))
    r = run_cli("chat", "--model", path, "--kv-cache-memory", "64MiB", stdin="Hi\n")
    assert r.returncode == 2
    assert "has no chat template" in r.stderr and "turboinfer generate" in r.stderr and ">>>" not in r.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model-xyz"], "no-such-model-xyz"),
    (["--model", "/nonexistent/model.gguf"], "/nonexistent/model.gguf"),
    (["--temperature", "-1"], "temperature"),
    (["--max-model-len", "8"], "max_model_len"),
])
def test_cli_bad_input_is_one_clear_line(default_model_path, args, message):
    full = ["generate", "The capital of France is a city that many people visit every year."]
    if "--model" not in args:
        full += ["--model", default_model_path]
    r = run_cli(*full, *args, "--kv-cache-memory", "64MiB")
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    err = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and message in err[0], r.stderr


def test_cli_corrupt_gguf(tmp_path, default_model_path):
    bad = tmp_path / "broken.gguf"
    with open(default_model_path, "rb") as f:
        bad.write_bytes(f.read(1_000_000))  # truncated: header intact, tensor data missing
    r = run_cli("generate", "hi", "--model", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr


class _Pipe:
    """Collects what a child writes to one pipe, on a thread, so a test can wait for a given output."""

    def __init__(self, f) -> None:
        import threading

        self.data, self._f, self._cond = b"", f, threading.Condition()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while chunk := os.read(self._f.fileno(), 65536):
            with self._cond:
                self.data += chunk
                self._cond.notify_all()
        with self._cond:
            self._f = None  # closed: nothing more will come
            self._cond.notify_all()

    def wait_for(self, pred, timeout: float) -> bytes:
        """Block until pred(everything read so far) is true; fail after `timeout` seconds or at end of file."""
        with self._cond:
            ok = self._cond.wait_for(lambda: pred(self.data) or self._f is None, timeout)
            assert ok and pred(self.data), f"timed out after {timeout}s; so far: {self.data[-2000:]!r}"
            return self.data


def test_cli_chat_ctrl_c_stops_reply_not_session(default_model_path):
    """Ctrl-C during a reply ends it with " [stopped]" and returns to the prompt, twice in one session. No sleeps:
    each SIGINT goes after the reply's first bytes are seen, so wherever in the step loop it lands, the outcome
    must be the same."""
    import signal

    proc = subprocess.Popen([sys.executable, "-m", "turboinfer", "chat", "--model", default_model_path,
                             "--max-tokens", "4000", "--ignore-eos", "--kv-cache-memory", "256MiB"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = _Pipe(proc.stdout), _Pipe(proc.stderr)
    try:
        for turn in range(2):
            seen = len(out.wait_for(lambda b: b.endswith(b">>> "), 300))  # at the prompt (model loaded)
            proc.stdin.write(b"Tell me a very long story.\n")
            proc.stdin.flush()
            out.wait_for(lambda b: len(b) > seen, 120)  # the reply is streaming
            proc.send_signal(signal.SIGINT)
            text = out.wait_for(lambda b: b.endswith(b" [stopped]\n>>> "), 120)
            assert text.count(b"[stopped]") == turn + 1, text
        proc.stdin.write(b"/exit\n")
        proc.stdin.close()
        rc = proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert rc == 0, err.data.decode(errors="replace")[-3000:]
    assert b"Traceback" not in err.data and b"Exception ignored" not in err.data, err.data.decode()[-3000:]
