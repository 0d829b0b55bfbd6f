"""A tiny model generates the same greedy tokens with the Triton kernels as with the PyTorch twins."""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from tiny_models import make_tiny_model  # noqa: E402

from turboinfer import LLM, SamplingParams  # noqa: E402


@pytest.mark.parametrize("name, kv_cache_dtype", [
    ("llama-gqa-llama3rope-tied", "auto"),
    ("mistral-window", "auto"),  # 24-token sliding window, exceeded by the long prompt
    ("llama-mqa", "int8"),
])
def test_same_greedy_tokens(name, kv_cache_dtype, tmp_path_factory, device, monkeypatch):
    monkeypatch.delenv("TURBOINFER_ATTENTION_BACKEND", raising=False)
    path, _ = make_tiny_model(tmp_path_factory, name)
    # prompts of different lengths; a 12-token budget splits the long one into chunks over a cached prefix and
    # mixes its chunks with the other requests' decodes in one step
    prompts = [list(range(3, 40)), list(range(50, 55)), [7]]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    tokens = {}
    for backend in ("torch", "triton"):
        llm = LLM(path, device=device.type, dtype="float32", max_model_len=128, kv_cache_memory="4MiB",
                  block_size=8, max_num_batched_tokens=12, kv_cache_dtype=kv_cache_dtype,
                  attention_backend=backend)
        module = llm.engine.executor.worker.runner.ops.decode_attention.__module__
        assert module.startswith("turboinfer.kernels." + ("triton" if backend == "triton" else "torch_ref"))
        outs = llm.generate(prompts, greedy, use_tqdm=False)
        tokens[backend] = [o.outputs[0].token_ids for o in outs]
    assert tokens["triton"] == tokens["torch"]


def test_backend_choice(monkeypatch):
    from turboinfer.config import EngineConfig
    from turboinfer.errors import InvalidRequestError
    from turboinfer.runner.worker import resolve_attention_backend

    monkeypatch.delenv("TURBOINFER_ATTENTION_BACKEND", raising=False)
    assert EngineConfig().attention_backend == "auto"
    with pytest.raises(InvalidRequestError, match="attention backend 'flash'"):
        EngineConfig(attention_backend="flash")
    monkeypatch.setenv("TURBOINFER_ATTENTION_BACKEND", "triton")
    assert EngineConfig().attention_backend == "triton"  # the variable replaces auto ...
    assert EngineConfig(attention_backend="torch").attention_backend == "torch"  # ... not an explicit choice

    assert resolve_attention_backend("auto", "cpu") == "torch"
    assert resolve_attention_backend("auto", "cuda") == "triton"
    assert resolve_attention_backend("torch", "cuda:1") == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(InvalidRequestError, match="needs a CUDA device"):
        resolve_attention_backend("triton", "cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", "cpu") == "triton"
