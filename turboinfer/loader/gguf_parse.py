"""A GGUF file's header read into plain Python values, and its tensors read one at a time into fresh memory.

The format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic, version, tensor and key counts,
then key/value metadata, then per tensor its name, dims (innermost first), ggml type and data offset; tensor
data starts at the next multiple of `general.alignment` after the header.

Why not `gguf.GGUFReader`: it builds a numpy view for every part of every metadata value, i.e. two per string
of the tokenizer's vocabulary and merges. For a 49k-token vocabulary that is ~160 MiB of Python objects for a
94 MiB file, seconds to build, and ~20 MiB of the heap stays fragmented after they are freed, all resident
after loading. Here the header is walked once with `struct`; long arrays (the vocabulary, merges, scores) are
only located (`ArrayRef`) and decoded when the tokenizer is built, so their ~100k small strings live for that
moment only instead of for the whole load. Tensor bytes are copied out with `readinto` instead of being
mapped, so no page of the file is part of this process's resident set once a tensor has been converted.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from turboinfer.errors import ModelLoadError, UnsupportedModelError
from turboinfer.loader.gguf_dequant import BLOCK_SIZES

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")
_LAZY_ARRAY = 1024  # arrays longer than this are located, not decoded, while the header is parsed


@dataclass(frozen=True)
class ArrayRef:
    """A long metadata array left in the file; `read_array` decodes it."""

    etype: int  # GGUF value type of the elements (a scalar type or string)
    count: int
    offset: int  # absolute byte offset of the first element


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
    metadata: dict[str, Any]  # every key: plain Python values (str, int, float, bool, lists), long arrays as ArrayRef
    tensors: list[TensorInfo]  # in file order
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = _U64.unpack_from(self.buf, self.pos)[0]
        start, self.pos = self.pos + 8, self.pos + 8 + n
        if self.pos > len(self.buf):
            raise struct.error("string runs past the end of the file")
        return self.buf[start:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype} at byte {self.pos}")
        etype, count = self.take("<I"), self.take("<Q")
        if count > _LAZY_ARRAY and (etype in _NUMPY or etype == _STRING):
            ref = ArrayRef(etype, count, self.pos)
            if etype == _STRING:
                for _ in range(count):
                    self.pos += 8 + _U64.unpack_from(self.buf, self.pos)[0]
            else:
                self.pos += count * np.dtype(_NUMPY[etype]).itemsize
            if self.pos > len(self.buf):
                raise struct.error("array runs past the end of the file")
            return ref
        return self.elements(etype, count)

    def elements(self, etype: int, count: int) -> list:
        if etype in _NUMPY:  # one conversion for the whole array (token types, scores)
            dt = np.dtype(_NUMPY[etype])
            end = self.pos + count * dt.itemsize
            if end > len(self.buf):
                raise struct.error("array runs past the end of the file")
            values = np.frombuffer(self.buf[self.pos:end], dtype=dt).tolist()
            self.pos = end
            return values
        if etype == _STRING:
            return [self.string() for _ in range(count)]
        return [self.value(etype) for _ in range(count)]


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
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size < 24:
                raise ValueError(f"{size} bytes is shorter than any GGUF header")
            # The mapping lives only while the header is parsed: its pages leave the resident set with it.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(path, buf, size)
    except (ValueError, struct.error, OverflowError, MemoryError, OSError) as e:
        detail = " ".join(str(e).split())  # one line: the CLI prints errors as a single line
        raise ModelLoadError(f"{path} is not a readable GGUF file (corrupt or truncated?): "
                             f"{type(e).__name__}: {detail}") from None


def _parse(path: str, buf: mmap.mmap, size: int) -> GGUFHeader:
    c = _Cursor(buf)
    if buf[:4] != b"GGUF":
        raise ValueError("its first bytes are not 'GGUF'")
    c.pos = 4
    version = c.take("<I")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version > 0xFFFF else ""
        raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are){hint}")
    num_tensors, num_kv = c.take("<Q"), c.take("<Q")
    if num_tensors * 24 + num_kv * 12 > size:  # every entry takes at least that many bytes
        raise ValueError(f"header claims {num_tensors} tensors and {num_kv} keys")
    metadata: dict[str, Any] = {}
    for _ in range(num_kv):
        key = c.string()
        metadata[key] = c.value(c.take("<I"))
    infos = []
    for _ in range(num_tensors):
        name = c.string()
        dims = tuple(c.take("<Q") for _ in range(c.take("<I")))
        qtype, offset = c.take("<I"), c.take("<Q")
        if (sizes := _block_size(qtype)) is None:
            raise ValueError(f"tensor {name} has unknown ggml type {qtype}")
        block, type_size = sizes
        infos.append((name, qtype, tuple(reversed(dims)), offset, math.prod(dims) // block * type_size))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-c.pos // alignment) * alignment
    tensors = [TensorInfo(n, q, s, data_start + o, b) for n, q, s, o, b in infos]
    return GGUFHeader(path, metadata, tensors, size)


def read_array(path: str, ref: ArrayRef) -> list:
    """The array's values as a Python list (decoded from the file now; nothing is cached)."""
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf)
            c.pos = ref.offset
            return c.elements(ref.etype, ref.count)
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
