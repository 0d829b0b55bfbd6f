"""KV-cache bytes for the engine's paged layout.

Per layer the engine allocates a K and a V tensor [num_blocks, block_size, num_kv_heads, head_dim]
(runner/model_runner.py). Quantized caches (kv dtype int8 or fp8) store 1-byte codes and, beside them, one
float32 scale per token and KV head for K and one for V ([num_blocks, block_size, num_kv_heads] each), so
    bytes/token/layer = 2 * kv_heads * head_dim * elem            (auto / float32 / bfloat16 / float16)
                      = 2 * kv_heads * (head_dim * 1 + 4)          (int8 / fp8)
Multi-head latent attention (DeepSeek-V2/V3) caches one latent per token and layer instead of K and V:
kv_lora_rank + qk_rope_head_dim values (plus one float32 scale when quantized), the same on every rank.
Block 0 of the pool is the null block that padded block-table entries point at: it is allocated like any other.

Layers are counted by their cache spec (kv_cache/spec.py), the same objects the engine sizes its pools with:
a sliding-window layer holds only the blocks its window and one step's new tokens touch, because the engine
gives back the blocks that slide out of the window.
"""

from __future__ import annotations

from turboinfer.errors import InvalidRequestError
from turboinfer.kv_cache.spec import FULL, LATENT, SLIDING, KVCacheGroup, KVCacheSpec, bytes_per_seq, group_layers, \
    null_bytes
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


def kv_cache_groups(arch, kv_dtype="auto", model_dtype="bfloat16", tp_size: int = 1) -> list[KVCacheGroup]:
    """The model's layers grouped by cache spec, as the engine groups its attention layers (one rank)."""
    s = model_shape(arch)
    check_tp(s, tp_size)
    kv_element(kv_dtype, model_dtype)  # a clear error for an unknown dtype
    name = dtype_name(model_dtype if dtype_name(kv_dtype) == "auto" else kv_dtype)
    name = {"half": "float16", "float": "float32", "float8_e4m3fn": "fp8"}.get(name, name)
    if s.is_mla:
        spec = KVCacheSpec(LATENT, 1, s.kv_lora_rank + s.qk_rope_head_dim, name)
        return group_layers([spec] * s.num_layers)
    heads = kv_heads_per_rank(s, tp_size)
    return group_layers([KVCacheSpec(FULL, heads, s.head_dim, name) if w is None else
                         KVCacheSpec(SLIDING, heads, s.head_dim, name, w) for w in s.layer_windows])


def kv_bytes_for_sequences(arch, num_tokens: int, num_seqs: int, block_size: int = 16, kv_dtype="auto",
                           model_dtype="bfloat16", tp_size: int = 1, max_num_new_tokens: int = 512,
                           null_block: bool = True) -> int:
    """KV bytes for `num_seqs` sequences of `num_tokens` each, whole blocks per sequence, plus the null blocks;
    sliding-window layers count what they hold at most with steps of up to `max_num_new_tokens` new tokens."""
    groups = kv_cache_groups(arch, kv_dtype, model_dtype, tp_size)
    per_seq = bytes_per_seq(groups, num_tokens, block_size, max_num_new_tokens)
    return num_seqs * per_seq + (null_bytes(groups, block_size) if null_block else 0)
