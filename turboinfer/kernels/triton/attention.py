"""The Triton backend of the op table: the same functions as `kernels/torch_ref/attention.py`."""

from turboinfer.kernels.triton.decode import decode_attention, plan_decode
from turboinfer.kernels.triton.prefill import prefill_attention
from turboinfer.kernels.triton.store_kv import store_kv

__all__ = ["decode_attention", "plan_decode", "prefill_attention", "store_kv"]
