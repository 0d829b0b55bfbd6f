"""A GGUF file's header read into plain Python values, and its tensors read one at a time into fresh memory.
The header walk itself is the estimator's (`memory/gguf_header.py`, which needs neither torch nor the file's data);
this module adds what loading needs: absolute tensor offsets, long arrays decoded on demand, tensor bytes.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor and key counts,
then key/value metadata, then per tensor its name, dims (innermost first), ggml type and data offset; tensor
data starts at the next multiple of `general.alignment` after the header.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata value, i.e. two per string
of the tokenizer's vocabulary and merges. For a 49k-token vocabulary that is ~160 MiB of Python objects for a
94 MiB file, seconds to build, and ~20 MiB of the heap stays fragmented after they are freed, all resident
after loading. Here the header is walked once with `struct`; long arrays (the vocabulary, merges, scores) are
only located (`LongArray`) and decoded when the tokenizer is built, so their ~100k small strings live for that
moment only instead of for the whole load. Tensor bytes are copied out with `readinto` instead of being
mapped, so no page of the file is part of this process's resident set once a tensor has been converted.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from turboinfer.errors import ModelLoadError
from turboinfer.loader.gguf_dequant import BLOCK_SIZES
from turboinfer.memory.gguf_header import LongArray, read_gguf_header

_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING = 8
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class TensorInfo:
    name: str  # as in the file (llama.cpp naming: blk.3.attn_q.weight)
    qtype: int  # ggml type id
    shape: tuple[int, ...]  # numpy order (outermost first): the header's dims reversed
    offset: int  # absolute byte offset of the data in the file
    nbytes: int  # as stored, block scales included

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class GGUFHeader:
    path: str
    metadata: dict[str, Any]  # every key: plain Python values (str, int, float, bool, lists), long arrays as LongArray
    tensors: list[TensorInfo]  # in file order
    file_size: int


def _block_size(qtype: int) -> tuple[int, int] | None:
    """(weights per block, bytes per block) of a ggml type. The `gguf` package's table covers every type but
    importing it costs ~2 MiB of Python objects that stay after loading, so it is asked only for the types the
    engine cannot load anyway (their size is still needed to check the file is whole)."""
    if qtype in BLOCK_SIZES:
        return BLOCK_SIZES[qtype]
    from gguf.constants import GGML_QUANT_SIZES

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}.get(qtype)


def read_header(path: str) -> GGUFHeader:
    """Parse `path`'s header; a damaged or non-GGUF file raises ModelLoadError (one line, naming the file)."""
    try:
        h = read_gguf_header(path, block_size=_block_size)
    except (ValueError, struct.error, OverflowError, MemoryError, OSError) as e:
        detail = " ".join(str(e).split())  # one line: the CLI prints errors as a single line
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                             f"{type(e).__name__}: {detail}") from None
    tensors = [TensorInfo(t.name, t.ggml_type, t.shape, h.data_offset + t.offset, t.nbytes) for t in h.tensors]
    return GGUFHeader(h.path, h.metadata, tensors, h.file_size)


def read_array(path: str, ref: LongArray) -> list:
    """The array's values as a Python list (decoded from the file now; nothing is cached)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if ref.etype in _NUMPY:  # one conversion for the whole array (token types, scores)
                dt = np.dtype(_NUMPY[ref.etype])
                end = ref.offset + ref.count * dt.itemsize
                if end > len(buf):
                    raise struct.error("array runs past the end of the file")
                return np.frombuffer(buf[ref.offset:end], dtype=dt).tolist()
            if ref.etype != _STRING:
                raise ValueError(f"arrays of GGUF type {ref.etype} are not read")
            values, pos = [], ref.offset
            for _ in range(ref.count):
                n = _U64.unpack_from(buf, pos)[0]
                if pos + 8 + n > len(buf):
                    raise struct.error("string runs past the end of the file")
                values.append(buf[pos + 8:pos + 8 + n].decode("utf-8", errors="replace"))
                pos += 8 + n
            return values
    except (ValueError, struct.error, OSError) as e:
        raise ModelLoadError(f"{path}: cannot read a metadata array at byte {ref.offset}: {e}") from None


def read_tensor(path: str, info: TensorInfo) -> np.ndarray:
    """The tensor's bytes as stored, flat uint8, in a new writable array (the page cache is not mapped)."""
    out = np.empty(info.nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        f.seek(info.offset)
        got = f.readinto(memoryview(out))
    if got != info.nbytes:
        raise ModelLoadError(f"{path} is truncated: tensor {info.name} has {got} of its {info.nbytes} bytes")
    return out
