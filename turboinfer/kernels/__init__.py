"""The op table: one set of attention / KV-cache functions per backend, same names and signatures.

`torch_ref` is plain PyTorch: the CPU path and the oracle the Triton kernels are tested against. `triton` is the
CUDA path (FlashAttention prefill and Flash-Decoding over the paged cache); it needs the `triton` package."""

from __future__ import annotations

from types import SimpleNamespace


def get_ops(backend: str = "torch") -> SimpleNamespace:
    if backend == "torch":
        from turboinfer.kernels.torch_ref import attention as mod
    elif backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError as e:
            raise ValueError("attention backend 'triton' needs the triton package (pip install triton)") from e
        from turboinfer.kernels.triton import attention as mod
    else:
        raise ValueError(f"attention backend {backend!r} is not available; use 'torch' or 'triton'")
    return SimpleNamespace(store_kv=mod.store_kv, prefill_attention=mod.prefill_attention,
                           decode_attention=mod.decode_attention, plan_decode=mod.plan_decode)
