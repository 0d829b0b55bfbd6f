"""GGUF weight bytes from the file header alone.

The header (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) lists every tensor's name, ggml type,
dimensions and data offset; tensor data starts at the next multiple of `general.alignment` after it. A
quantized tensor is a sequence of blocks, each covering `block_size` weights in `type_size` bytes (scales and
mins included: Q4_1 is 32 weights in 20 bytes), so its size is numel / block_size * type_size exactly.
Parsing walks the header with struct over a memory map and skips long arrays (the tokenizer's vocabulary)
without building them, which takes milliseconds where building every value takes seconds.
"""

from __future__ import annotations

import math
import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any

from turboinfer.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from turboinfer.memory.shapes import ModelShape, dtype_bytes, shape_from_hf_config, with_notes
from turboinfer.models import registry
from turboinfer.models.gguf_config import GGUFSource

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 1024  # longer arrays are skipped; their length is kept as LongArray
FLOAT_TYPES = {0: "F32", 1: "F16", 30: "BF16"}  # ggml types that are plain floats (not block-quantized)


@dataclass(frozen=True)
class LongArray:
    """A metadata array not read into memory (e.g. tokenizer.ggml.tokens); the loader decodes it from `offset`
    when the tokenizer is built (loader/gguf_parse.read_array)."""

    count: int
    etype: int  # GGUF value type of the elements
    offset: int  # absolute byte offset of the first element


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (outermost first): the header's ne reversed
    ggml_type: int
    offset: int  # from the start of the data section
    nbytes: int  # as stored, block scales included

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFHeader:
    path: str
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int  # first byte of tensor data: header + metadata + tensor infos + alignment padding
    file_size: int


def _quant_sizes() -> dict[int, tuple[int, int]]:
    from gguf.constants import GGML_QUANT_SIZES  # ggml type -> (weights per block, bytes per block)

    return {int(k): v for k, v in GGML_QUANT_SIZES.items()}


def type_name(ggml_type: int) -> str:
    try:
        from gguf.constants import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type{ggml_type}"


class _Cursor:
    def __init__(self, buf, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, fmt: str):
        try:
            v = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise ModelLoadError(f"{self.path}: GGUF header is truncated at byte {self.pos}") from None
        self.pos += struct.calcsize(fmt)
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise ModelLoadError(f"{self.path}: GGUF header is truncated at byte {self.pos}")
        s = bytes(self.buf[self.pos:end]).decode("utf-8", errors="replace")
        self.pos = end
        return s

    def skip_string(self) -> None:
        self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ModelLoadError(f"{self.path}: unknown GGUF value type {vtype} at byte {self.pos}")
        etype, count = self.take("<I"), self.take("<Q")
        if count <= _KEEP_ARRAY:
            return [self.value(etype) for _ in range(count)]
        start = self.pos
        if etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
        elif etype == _STRING:
            for _ in range(count):
                self.skip_string()
        else:
            for _ in range(count):
                self.value(etype)
        if self.pos > len(self.buf):
            raise ModelLoadError(f"{self.path}: GGUF header is truncated")
        return LongArray(count, etype, start)


def read_gguf_header(path: str | os.PathLike, block_size=None) -> GGUFHeader:
    """`block_size(ggml_type) -> (weights, bytes) | None` overrides the `gguf` package's table (the loader passes
    its own, which imports `gguf` only for types it cannot load)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file {path} does not exist")
    if block_size is None:
        block_size = _quant_sizes().get
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise ModelLoadError(f"{path} is too short to be a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            c = _Cursor(buf, path)
            if bytes(buf[:4]) != b"GGUF":
                raise ModelLoadError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
            c.pos = 4
            version = c.take("<I")
            if version not in (2, 3):
                raise UnsupportedModelError(f"{path}: GGUF version {version} is not supported (2 and 3 are; "
                                            "a huge number means a big-endian file)")
            num_tensors, num_kv = c.take("<Q"), c.take("<Q")
            metadata = {}
            for _ in range(num_kv):
                key = c.string()
                metadata[key] = c.value(c.take("<I"))
            tensors = []
            for _ in range(num_tensors):
                name = c.string()
                dims = [c.take("<Q") for _ in range(c.take("<I"))]
                ggml_type, offset = c.take("<I"), c.take("<Q")
                if (sizes := block_size(ggml_type)) is None:
                    raise UnsupportedModelError(f"{path}: tensor {name} has unknown ggml type {ggml_type}")
                block, type_size = sizes
                numel = math.prod(dims)
                tensors.append(GGUFTensor(name, tuple(reversed(dims)), ggml_type, offset,
                                          numel // block * type_size))
            alignment = int(metadata.get("general.alignment", 32))
            data_offset = -(-c.pos // alignment) * alignment
    for t in tensors:
        if data_offset + t.offset + t.nbytes > size:
            raise ModelLoadError(f"{path} is truncated: tensor {t.name} ends past the end of the file")
    return GGUFHeader(path, version, metadata, tensors, data_offset, size)


@dataclass
class GGUFWeights:
    """Weight bytes of a GGUF file, three ways."""

    path: str
    stored_bytes: int  # every tensor as stored in the file (quant blocks with their scales): the file's payload
    packed_bytes: int  # in memory as the engine keeps them (see loaded_bytes), float tensors converted to `dtype`
    dequantized_bytes: int  # every tensor dequantized to `dtype` (float32 when dtype is None)
    dtype: str | None  # the dtype float / dequantized tensors are loaded in
    num_params: int
    num_tensors: int
    data_offset: int  # header size including alignment padding: stored_bytes + data_offset <= file size
    file_size: int
    by_type: dict[str, tuple[int, int]] = field(default_factory=dict)  # ggml type -> (tensors, stored bytes)


# How the engine keeps GGUF tensors (loader/model_loader.py iter_gguf): linear weights of 4-bit types as torch's int4
# packing with a bf16 (scale, offset) pair per 32 weights (5/8 byte a weight, on CUDA two codes a byte and fp16
# pairs: the same); of Q8_0 / Q5_K / Q6_K as int8 codes with a float32 scale per group (32, 32, 16) and for Q5_K a
# float32 offset too; a Q8_0 token embedding on CPU as stored, a Q6_K / Q5_K one like those linear weights; anything
# else quantized, dequantized to the dtype.
_LINEAR = re.compile(r"(blk\.\d+\.(attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down)|output)\.weight$")
_Q4_TYPES = {2, 3, 12}  # Q4_0, Q4_1, Q4_K
_INT8_GROUPS = {8: 32, 13: 32, 14: 16}  # Q8_0, Q5_K, Q6_K -> group size
_INT8_ZEROS = {13}  # Q5_K


def loaded_bytes(header: GGUFHeader, dtype: str | None = None, device: str = "cpu") -> dict[str, int]:
    """Bytes each tensor takes once loaded (see above; `dtype` None: float tensors as stored, others float32). A merged
    layer that mixes 4-bit and 5/6/8-bit shards keeps each in its own format, so tensors count one by one."""
    elem = dtype_bytes(dtype) if dtype is not None else None
    out = {}
    for t in header.tensors:
        g = t.ggml_type
        if g in FLOAT_TYPES:
            out[t.name] = t.numel * elem if elem is not None else t.nbytes
        elif len(t.shape) == 2 and _LINEAR.match(t.name) and g in _Q4_TYPES:
            out[t.name] = t.numel * 5 // 8
        elif t.name == "token_embd.weight" and g == 8 and device == "cpu":
            out[t.name] = t.nbytes
        elif g in _INT8_GROUPS and (len(t.shape) == 2 and _LINEAR.match(t.name) or
                                    t.name == "token_embd.weight" and device == "cpu"):
            out[t.name] = t.numel + t.numel // _INT8_GROUPS[g] * (8 if g in _INT8_ZEROS else 4)
        else:
            out[t.name] = t.numel * (elem or 4)
    return out


def gguf_weights(header: GGUFHeader, dtype: str | None = None, device: str = "cpu") -> GGUFWeights:
    elem = dtype_bytes(dtype) if dtype is not None else None
    stored = dequant = params = 0
    by_type: dict[str, tuple[int, int]] = {}
    for t in header.tensors:
        stored += t.nbytes
        params += t.numel
        dequant += t.numel * (elem or 4)
        n, b = by_type.get(type_name(t.ggml_type), (0, 0))
        by_type[type_name(t.ggml_type)] = (n + 1, b + t.nbytes)
    packed = sum(loaded_bytes(header, dtype, device).values())
    return GGUFWeights(header.path, stored, packed, dequant, dtype, params, len(header.tensors),
                       header.data_offset, header.file_size, by_type)


def weight_bytes_from_gguf(path: str | os.PathLike, dtype_for_float_tensors: str | None = None) -> GGUFWeights:
    """Exact weight bytes of a GGUF file from its header: as stored, kept packed with float tensors in
    `dtype_for_float_tensors`, and fully dequantized to it."""
    return gguf_weights(read_gguf_header(path), dtype_for_float_tensors)


# general.architecture -> HF model_type of the families the engine does not run (its own are translated by their
# descriptor, as the loader translates them)
_GGUF_TYPES = {"phi3": "phi3", "gemma": "gemma", "gemma2": "gemma2", "granite": "granite", "qwen2moe": "qwen2_moe",
               "qwen3moe": "qwen3_moe", "deepseek2": "deepseek_v2"}


def read_floats(header: GGUFHeader, name: str) -> list[float]:
    """A small F32 / F16 tensor's values (the config a converter stores as a tensor, e.g. Llama 3's rope_freqs)."""
    t = next(t for t in header.tensors if t.name == name)
    fmt = {0: "f", 1: "e"}.get(t.ggml_type)
    if fmt is None:
        raise UnsupportedModelError(f"{header.path}: tensor {name} is stored as {type_name(t.ggml_type)}, not F32/F16")
    with open(header.path, "rb") as f:
        f.seek(header.data_offset + t.offset)
        return list(struct.unpack(f"<{t.numel}{fmt}", f.read(t.nbytes)))


def shape_from_gguf(header: GGUFHeader) -> ModelShape:
    """GGUF metadata -> ModelShape. Missing keys raise naming the GGUF keys."""
    md = header.metadata
    arch = str(md.get("general.architecture", ""))
    family = registry.by_gguf_architecture(arch)
    if family is not None and not md.get(f"{arch}.expert_count"):  # a "llama" file with experts is Mixtral
        src = GGUFSource(header.path, md, {t.name: t.shape for t in header.tensors},
                         lambda name: read_floats(header, name))
        return _shape_from_config(header, family.gguf_config(src), [])
    names = {t.name: t for t in header.tensors}
    model_type = "mixtral" if arch == "llama" else _GGUF_TYPES.get(arch)
    if model_type is None:
        known = sorted({*_GGUF_TYPES, *registry.SUPPORTED_GGUF_ARCHITECTURES})
        raise UnsupportedModelError(f"{header.path}: GGUF architecture {arch or '<missing>'!r} is not known to the "
                                    f"memory estimator (known: {', '.join(known)})")
    notes: list[str] = []
    missing: list[str] = []

    def get(key: str, default: Any = None, required: bool = False):
        v = md.get(f"{arch}.{key}", default)
        if isinstance(v, list):  # per-layer values: the largest is the safe bound
            if len(set(v)) > 1:
                notes.append(f"{arch}.{key} varies per layer; the largest value is used")
            v = max(v) if v else default
        if v is None and required:
            missing.append(f"{arch}.{key}")
        return v

    hidden, layers, heads = get("embedding_length", required=True), get("block_count", required=True), \
        get("attention.head_count", required=True)
    emb = names.get("token_embd.weight")
    vocab = get("vocab_size") or (emb.shape[0] if emb else None)
    if vocab is None:
        tokens = md.get("tokenizer.ggml.tokens")
        vocab = tokens.count if isinstance(tokens, LongArray) else (len(tokens) if tokens else None)
    if vocab is None:
        missing.append(f"{arch}.vocab_size")
    if missing:
        raise UnsupportedModelError(f"{header.path} lacks GGUF metadata {', '.join(missing)}")
    cfg: dict[str, Any] = {
        "model_type": model_type, "vocab_size": int(vocab), "hidden_size": int(hidden),
        "num_hidden_layers": int(layers), "num_attention_heads": int(heads),
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "head_dim": int(get("attention.key_length") or hidden // heads),
        "intermediate_size": int(get("feed_forward_length", 0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names, "sliding_window": get("attention.sliding_window"),
    }
    if model_type.startswith("qwen") and cfg["sliding_window"]:
        cfg["use_sliding_window"] = True
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2"):
        cfg.update(num_local_experts=get("expert_count"), num_experts_per_tok=get("expert_used_count"),
                   moe_intermediate_size=get("expert_feed_forward_length") or cfg["intermediate_size"],
                   shared_expert_intermediate_size=get("expert_shared_feed_forward_length"))
    if model_type == "deepseek_v2":
        rope = int(get("rope.dimension_count", 64))
        cfg.update(kv_lora_rank=get("attention.kv_lora_rank"), q_lora_rank=get("attention.q_lora_rank") or None,
                   qk_rope_head_dim=rope, qk_nope_head_dim=cfg["head_dim"] - rope,
                   v_head_dim=get("attention.value_length") or cfg["head_dim"] - rope,
                   n_shared_experts=get("expert_shared_count", 0),
                   first_k_dense_replace=get("leading_dense_block_count", 0))
        if "blk.0.attn_kv_b.weight" not in names and "blk.0.attn_k_b.weight" in names:
            notes.append("MLA weights are stored split (attn_k_b/attn_v_b); KV numbers are unaffected")
    return _shape_from_config(header, cfg, notes)


def _shape_from_config(header: GGUFHeader, cfg: dict[str, Any], notes: list[str]) -> ModelShape:
    try:
        shape = shape_from_hf_config(cfg)
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{header.path}: {e} (read from GGUF metadata)") from None
    return with_notes(shape, *notes) if notes else shape
