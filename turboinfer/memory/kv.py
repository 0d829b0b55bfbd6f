"""KV-cache bytes for the engine's paged layout.

Per layer the engine allocates a K and a V tensor [num_blocks, block_size, num_kv_heads, head_dim]
(runner/model_runner.py). Quantized caches (kv dtype int8 or fp8) store 1-byte codes and, beside them, one
float32 scale per token and KV head for K and one for V ([num_blocks, block_size, num_kv_heads] each), so
    bytes/token/layer = 2 * kv_heads * head_dim * elem            (auto / float32 / bfloat16 / float16)
                      = 2 * kv_heads * (head_dim * 1 + 4)          (int8 / fp8)
Multi-head latent attention (DeepSeek-V2/V3) caches one latent per token and layer instead of K and V:
kv_lora_rank + qk_rope_head_dim values (plus one float32 scale when quantized), the same on every rank.
Block 0 of the pool is the null block that padded block-table entries point at: it is allocated like any other.
"""

from __future__ import annotations

from turboinfer.errors import InvalidRequestError
from turboinfer.memory.params import check_tp, kv_heads_per_rank
from turboinfer.memory.shapes import ModelShape, dtype_bytes, dtype_name, model_shape

KV_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8")
SCALE_BYTES = 4  # float32 scale per token and KV head of a quantized cache


def kv_element(kv_dtype, model_dtype) -> tuple[int, bool]:
    """(bytes per cached value, whether per-token scales are stored)."""
    name = dtype_name(kv_dtype)
    if name == "auto":
        name = dtype_name(model_dtype)
    if name not in KV_DTYPES and name not in ("float8_e4m3fn", "float8_e5m2", "half", "float"):
        raise InvalidRequestError(f"--kv-cache-dtype {name!r} is not one of {', '.join(KV_DTYPES)}")
    size = dtype_bytes(name)
    return size, size == 1


def kv_bytes_per_token_layer(s: ModelShape, kv_dtype="auto", model_dtype="bfloat16", tp_size: int = 1) -> int:
    """One token in one (full-attention) layer, on one rank."""
    elem, scaled = kv_element(kv_dtype, model_dtype)
    if s.is_mla:
        return (s.kv_lora_rank + s.qk_rope_head_dim) * elem + (SCALE_BYTES if scaled else 0)
    heads = kv_heads_per_rank(s, tp_size)
    per = heads * (s.head_dim + s.v_head_dim) * elem
    return per + (2 * heads * SCALE_BYTES if scaled else 0)


def kv_cache_bytes_per_token(arch, kv_dtype="auto", model_dtype="bfloat16", tp_size: int = 1) -> int:
    """Bytes one cached token costs across all layers (per rank under tensor parallelism). kv_dtype 'auto'
    stores K/V in model_dtype; both accept names ('bfloat16') or torch dtypes."""
    s = model_shape(arch)
    check_tp(s, tp_size)
    return s.num_layers * kv_bytes_per_token_layer(s, kv_dtype, model_dtype, tp_size)


def kv_cache_bytes(arch, num_blocks: int, block_size: int, kv_dtype="auto", model_dtype="bfloat16",
                   tp_size: int = 1) -> int:
    """Bytes of a pool of `num_blocks` blocks (null block included) as the engine allocates it."""
    if num_blocks < 0 or block_size < 1:
        raise InvalidRequestError(f"need num_blocks >= 0 and block_size >= 1, got {num_blocks}, {block_size}")
    return num_blocks * block_size * kv_cache_bytes_per_token(arch, kv_dtype, model_dtype, tp_size)


def num_kv_blocks_for_budget(arch, budget_bytes: int, block_size: int, kv_dtype="auto", model_dtype="bfloat16",
                             tp_size: int = 1) -> int:
    """Most blocks (null block included) whose pool fits in `budget_bytes`."""
    per_block = block_size * kv_cache_bytes_per_token(arch, kv_dtype, model_dtype, tp_size)
    return max(0, budget_bytes) // per_block


def blocks_per_sequence(s: ModelShape, num_tokens: int, block_size: int, window_eviction: bool) -> list[int]:
    """Per layer, the blocks one sequence of `num_tokens` occupies. The engine keeps every block of a sequence
    (window_eviction False); a cache that frees blocks once they slide out of a layer's window needs at most
    ceil(window / block_size) + 1 of them on that layer (the window straddles a block boundary)."""
    full = -(-num_tokens // block_size)
    if not window_eviction:
        return [full] * s.num_layers
    return [full if w is None else min(full, -(-w // block_size) + 1) for w in s.layer_windows]


def kv_bytes_for_sequences(arch, num_tokens: int, num_seqs: int, block_size: int = 16, kv_dtype="auto",
                           model_dtype="bfloat16", tp_size: int = 1, window_eviction: bool = False,
                           null_block: bool = True) -> int:
    """KV bytes for `num_seqs` sequences of `num_tokens` each, whole blocks per sequence, plus the null block."""
    s = model_shape(arch)
    check_tp(s, tp_size)
    per_layer_token = kv_bytes_per_token_layer(s, kv_dtype, model_dtype, tp_size)
    blocks = blocks_per_sequence(s, num_tokens, block_size, window_eviction)
    tokens = num_seqs * sum(blocks) * block_size + (s.num_layers * block_size if null_block else 0)
    return tokens * per_layer_token
