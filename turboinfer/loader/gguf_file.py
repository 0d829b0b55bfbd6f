"""One GGUF file: its metadata as an HF-style config, its tensors under HF parameter names.

Parsing is `gguf_parse.py`'s (a lean reader: the tokenizer's vocabulary is the bulk of a small model's header);
this file adds what a model loader needs: clear errors for files that are not usable, and undoing the one layout
change llama.cpp's converter makes to weights (the q/k row permutation) and Gemma's stored norm offset. What the
config keys and tensor names mean is the model family's (`models/registry.py` finds the family by the file's
`general.architecture`; its descriptor translates).

Shapes: everything returned here is in torch/numpy order (outermost first), so a linear weight is
`[out_features, in_features]` as in HF checkpoints. The GGUF header stores dimensions innermost first
(`[in_features, out_features]`); it is reversed once, when the header is parsed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch

from turboinfer.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from turboinfer.loader.gguf_dequant import BLOCK_SIZES, dequantize, type_name
from turboinfer.loader.gguf_parse import GGUFHeader, TensorInfo, read_array, read_header, read_tensor
from turboinfer.memory.gguf_header import LongArray
from turboinfer.models.family import ModelFamily
from turboinfer.models.gguf_config import CONFIG_TENSORS, GGUFSource
from turboinfer.models.registry import SUPPORTED_GGUF_ARCHITECTURES, by_gguf_architecture


def unpermute_qk_rows(x, num_heads: int):
    """Undo llama.cpp's `LlamaModel.permute` on the rows of a q/k weight, bias or raw block matrix.

    The converter reorders each head's rows from HF's rotate-half layout (pairs (i, i + head_dim/2)) to
    ggml's interleaved one (pairs (2i, 2i+1)): rows viewed as [num_heads, 2, head_dim/2] are swapped to
    [num_heads, head_dim/2, 2]. Rows are whole output features, so this works on numpy or torch arrays,
    dequantized or still in quant blocks (blocks never cross rows)."""
    rows = x.shape[0]
    y = x.reshape(num_heads, rows // num_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2)
    return y.reshape(x.shape)


# Model loading opens the same file for config, tokenizer and weights, so parsed headers are kept (keyed by
# identity of the file on disk) until `release_readers`: the vocabulary lists are megabytes of Python objects.
_READERS: "OrderedDict[tuple, GGUFHeader]" = OrderedDict()
_MAX_READERS = 2


def release_readers() -> None:
    """Forget the parsed headers once a model is loaded."""
    _READERS.clear()


def _open_reader(path: str) -> GGUFHeader:
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    if key in _READERS:
        _READERS.move_to_end(key)
        return _READERS[key]
    header = read_header(path)
    _READERS[key] = header
    while len(_READERS) > _MAX_READERS:
        _READERS.popitem(last=False)
    return header


class GGUFFile:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise ModelNotFoundError(f"GGUF file {self.path} does not exist")
        self._header = _open_reader(self.path)
        # None for an architecture no family reads: the file still opens (its tokenizer, its metadata), and
        # asking for its config or weights names the architecture
        self.family: ModelFamily | None = by_gguf_architecture(self.architecture)
        self._entries: dict[str, TensorInfo] = {}  # hf name -> tensor
        self._unmapped: list[str] = []
        for t in self._header.tensors:
            if t.offset + t.nbytes > self._header.file_size:
                raise ModelLoadError(f"{self.path} is truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} "
                                     f"but the file has {self._header.file_size}")
            hf = self.family.hf_tensor_name(t.name) if self.family else None
            if hf is not None:
                self._entries[hf] = t
            elif t.name not in CONFIG_TENSORS:
                self._unmapped.append(t.name)
        self._source = GGUFSource(self.path, self.metadata, {t.name: t.shape for t in self._header.tensors},
                                  self._read_floats)

    # ---- metadata -----------------------------------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, Any]:
        """Every key/value of the file as plain Python values (str, int, float, bool, lists of those), except
        arrays of over a thousand values (the tokenizer's), which are `LongArray`s: `tokenizer_metadata` reads
        them."""
        return self._header.metadata

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def tokenizer_metadata(self) -> dict[str, Any]:
        """The `tokenizer.*` keys with every value read (vocabulary and merges are decoded on each call, so
        they are held only while the caller builds its tokenizer)."""
        return {k: read_array(self.path, v) if isinstance(v, LongArray) else v
                for k, v in self.metadata.items() if k.startswith("tokenizer.")}

    def _family(self) -> ModelFamily:
        if self.family is None:
            raise UnsupportedModelError(f"GGUF architecture {self.architecture or '<missing>'!r} in {self.path} is "
                                        f"not supported (supported: {', '.join(SUPPORTED_GGUF_ARCHITECTURES)})")
        return self.family

    def _read_floats(self, gguf_name: str) -> list[float]:
        t = next(t for t in self._header.tensors if t.name == gguf_name)
        return dequantize(read_tensor(self.path, t), t.qtype, (t.numel,)).double().tolist()

    def hf_config(self) -> dict[str, Any]:
        """The file's hyperparameters as an HF `config.json`-style dict (what the family's `parse_config` reads)."""
        return self._family().gguf_config(self._source)

    # ---- tensors ------------------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """HF names of the file's parameters, in file order."""
        return list(self._entries)

    def check_mapped(self) -> None:
        self._family()
        if self._unmapped:
            raise UnsupportedModelError(f"{self.path}: tensor(s) {', '.join(self._unmapped[:5])} have no "
                                        f"equivalent in the {self.architecture} model")

    def _qk_heads(self, hf_name: str) -> int | None:
        """Head count to un-permute this tensor's rows with, or None when it is stored as HF stores it."""
        if self.architecture not in self._family().gguf_qk_permuted:
            return None
        heads = int(self._source.uniform("attention.head_count"))
        if ".self_attn.q_proj." in hf_name:
            return heads
        if ".self_attn.k_proj." in hf_name:
            return int(self._source.uniform("attention.head_count_kv", heads))
        return None

    def _entry(self, hf_name: str) -> TensorInfo:
        try:
            return self._entries[hf_name]
        except KeyError:
            raise KeyError(f"{self.path} has no tensor {hf_name!r}") from None

    def raw_tensor(self, hf_name: str) -> tuple[int, np.ndarray, tuple[int, ...]]:
        """(ggml type id, bytes as stored [*shape[:-1], bytes_per_row] uint8, numpy-order shape) without
        dequantizing, in memory of its own (the file is read, not mapped). q/k rows of Llama files are already
        un-permuted."""
        e = self._entry(hf_name)
        elems, nbytes = BLOCK_SIZES.get(e.qtype, (None, None))
        if elems is None:
            raise UnsupportedModelError(f"{self.path}: tensor {e.name} has unsupported type {type_name(e.qtype)}")
        raw = read_tensor(self.path, e).reshape(*e.shape[:-1], e.shape[-1] // elems * nbytes)
        heads = self._qk_heads(hf_name)
        if heads is not None:
            raw = np.ascontiguousarray(unpermute_qk_rows(raw, heads))
        return e.qtype, raw, e.shape

    def get_tensor(self, hf_name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        e = self._entry(hf_name)
        t = dequantize(read_tensor(self.path, e), e.qtype, e.shape)
        heads = self._qk_heads(hf_name)
        if heads is not None:
            t = unpermute_qk_rows(t, heads).contiguous()
        offset = self._family().gguf_norm_offset
        if offset and hf_name.endswith("norm.weight"):
            t = t.float() - offset
        return t.to(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, dequantized tensor in HF layout) for every parameter, one at a time."""
        self.check_mapped()
        for hf_name in self._entries:
            yield hf_name, self.get_tensor(hf_name, dtype)
