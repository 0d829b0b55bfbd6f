"""What each attention layer keeps in the paged cache, and how many blocks that takes (no torch).

Every attention layer declares a `KVCacheSpec`: full attention (every token stays), a sliding window (tokens that
fall out of the window are never read again, so their blocks go back to the pool), or a latent cache (MLA: one
vector per token instead of K and V). Layers with equal specs form a group that shares one block table per
request and one block pool; the KV manager allocates per group. The same arithmetic sizes the engine's pool and
the memory estimator's figure, so the two agree to the byte.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL, SLIDING, LATENT = "full", "sliding_window", "latent"
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1, "fp8": 1, "float8_e4m3fn": 1}
SCALE_BYTES = 4  # quantized caches keep one float32 scale per token and KV head (K and V each)


@dataclass(frozen=True)
class KVCacheSpec:
    kind: str  # FULL | SLIDING | LATENT
    num_kv_heads: int  # heads cached per token (LATENT: 1)
    head_dim: int  # values per head for K and for V (LATENT: the latent width, cached once, no V)
    dtype: str  # storage dtype name: float32 | bfloat16 | float16 | int8 | fp8
    sliding_window: int | None = None  # SLIDING only: a query at position p sees keys p - window + 1 .. p

    def __post_init__(self) -> None:
        if self.kind not in (FULL, SLIDING, LATENT):
            raise ValueError(f"unknown KV cache kind {self.kind!r}")
        if (self.kind == SLIDING) != (self.sliding_window is not None):
            raise ValueError("a sliding-window spec needs its window, and only it has one")

    @property
    def is_quantized(self) -> bool:
        return ELEMENT_BYTES[self.dtype] == 1

    def bytes_per_token(self) -> int:
        """One token of one layer: K and V codes (the latent once) plus their scales when quantized."""
        tensors = 1 if self.kind == LATENT else 2
        scales = tensors * self.num_kv_heads * SCALE_BYTES if self.is_quantized else 0
        return tensors * self.num_kv_heads * self.head_dim * ELEMENT_BYTES[self.dtype] + scales

    def max_blocks_per_seq(self, max_model_len: int, block_size: int, max_num_new_tokens: int) -> int:
        """Most blocks one sequence holds at once in this layer. A full layer keeps every token. A sliding layer
        frees blocks wholly before the window of the step's first query; a step of n new tokens at cache row c
        reads rows c - window + 1 .. c + n - 1, a span of window + n - 1 rows, which touches at most
        (span + 2 * block_size - 2) // block_size blocks when it starts at the worst offset in a block."""
        full = -(-max_model_len // block_size)
        if self.kind != SLIDING:
            return full
        span = self.sliding_window + max_num_new_tokens - 1
        return min(full, (span + 2 * block_size - 2) // block_size)


@dataclass(frozen=True)
class KVCacheGroup:
    """Layers that share a spec, hence one block table per request and one pool."""

    spec: KVCacheSpec
    layer_ids: tuple[int, ...]  # indices into the model's attention layers
    num_blocks: int = 0  # pool size, the null block 0 included (set once the pool is sized)

    def page_bytes(self, block_size: int) -> int:
        """Bytes one block id costs across this group's layers."""
        return len(self.layer_ids) * block_size * self.spec.bytes_per_token()


def group_layers(specs: list[KVCacheSpec]) -> list[KVCacheGroup]:
    """Group layer specs, full attention first, then the others in order of first appearance."""
    order: dict[KVCacheSpec, list[int]] = {}
    for i, s in enumerate(specs):
        order.setdefault(s, []).append(i)
    groups = [KVCacheGroup(s, tuple(ids)) for s, ids in order.items()]
    return sorted(groups, key=lambda g: g.spec.kind != FULL)


def bytes_per_seq(groups: list[KVCacheGroup], max_model_len: int, block_size: int, max_num_new_tokens: int) -> int:
    """KV bytes one sequence of max_model_len tokens can hold at once, every group counted at its own need."""
    return sum(g.spec.max_blocks_per_seq(max_model_len, block_size, max_num_new_tokens) * g.page_bytes(block_size)
               for g in groups)


def null_bytes(groups: list[KVCacheGroup], block_size: int) -> int:
    """Block 0 of every pool: the null block that padded and freed block-table entries point at."""
    return sum(g.page_bytes(block_size) for g in groups)


def size_pools(groups: list[KVCacheGroup], budget_bytes: int, max_model_len: int, block_size: int,
               max_num_new_tokens: int) -> list[KVCacheGroup]:
    """Split a byte budget between the groups in proportion to what one sequence needs of each, so the pool
    holds the same number of whole sequences in every group. One group: budget // page bytes, as ever."""
    per_seq = bytes_per_seq(groups, max_model_len, block_size, max_num_new_tokens)
    room = max(0, budget_bytes - null_bytes(groups, block_size))
    sized = []
    for g in groups:
        need = g.spec.max_blocks_per_seq(max_model_len, block_size, max_num_new_tokens)
        sized.append(KVCacheGroup(g.spec, g.layer_ids, room * need // per_seq + 1))
    return sized


def pool_bytes(groups: list[KVCacheGroup], block_size: int) -> int:
    return sum(g.num_blocks * g.page_bytes(block_size) for g in groups)


def max_len_that_fits(groups: list[KVCacheGroup], block_size: int, max_num_new_tokens: int) -> int | None:
    """Longest sequence the sized pools can hold alone (None: unbounded by the cache, e.g. only sliding layers
    with room for their window)."""
    best = None
    for g in groups:
        usable = g.num_blocks - 1
        bounded = g.spec.kind != SLIDING or usable < g.spec.max_blocks_per_seq(10**12, block_size, max_num_new_tokens)
        if bounded:
            best = usable * block_size if best is None else min(best, usable * block_size)
    return best
