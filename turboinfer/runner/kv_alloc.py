"""KV-pool tensors on CPU that take memory only where written.

`torch.zeros` writes every byte of the pool at startup, so a 2 GiB pool is 2 GiB resident before the first
request. An anonymous private mapping reads as zeros too (the padded block-table entries that point at block 0 need
that), but the kernel backs a page only when it is first touched: resident KV grows with the blocks requests have
used, up to the pool's size once every block has held tokens, and goes back to the system when the pool is freed.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import torch

PAGE = mmap.PAGESIZE


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero tensor; on CPU backed by its own anonymous mapping (page-aligned, resident only once written)."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    buf = mmap.mmap(-1, max(nbytes, 1))  # MAP_PRIVATE | MAP_ANONYMOUS; the tensor keeps it alive
    return torch.frombuffer(buf, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)


_libc = None


def resident_bytes(tensors: list[torch.Tensor]) -> int | None:
    """Bytes of these CPU tensors' pages that are resident (mincore: written, or read at least once), or None where
    that cannot be read."""
    global _libc
    if os.name != "posix":
        return None
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
            _libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        total = 0
        for t in tensors:
            if t is None or t.device.type != "cpu" or not t.numel():
                continue
            start = t.data_ptr() // PAGE * PAGE
            length = t.data_ptr() + t.numel() * t.element_size() - start
            pages = (length + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) != 0:
                return None
            total += int((torch.frombuffer(vec, dtype=torch.uint8) & 1).sum()) * PAGE
        return total
    except (OSError, AttributeError):
        return None
