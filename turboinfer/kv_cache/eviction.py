"""Which free block to hand out next: the eviction policy of the prefix cache (no torch).

A freed block keeps its prefix hash until it is handed out again, so the order in which free blocks are reused is
the order in which cached prefixes are forgotten. The pool takes any object with this interface; LRU (the block
freed longest ago goes first) is what vLLM and SGLang use by default.
"""

from __future__ import annotations

from collections import OrderedDict


class LRUEviction:
    """Free block ids, oldest-freed first. OrderedDict keys give O(1) removal when a cached block is revived."""

    def __init__(self, block_ids=()) -> None:
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in block_ids)

    def __len__(self) -> int:
        return len(self._free)

    def push(self, block_id: int) -> None:
        """A block's last reference went away: it becomes the newest candidate for reuse."""
        self._free[block_id] = None

    def remove(self, block_id: int) -> None:
        """A free block was found in the prefix cache and is in use again."""
        del self._free[block_id]

    def pop(self) -> int:
        """The block to reuse now (its cached prefix, if any, is forgotten by the caller)."""
        block_id, _ = self._free.popitem(last=False)
        return block_id
