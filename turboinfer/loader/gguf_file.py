"""One GGUF file: its metadata as an HF-style config, its tensors under HF parameter names.

Parsing is `gguf_parse.py`'s (a lean reader: the tokenizer's vocabulary is the bulk of a small model's header);
this file adds what a model loader needs: clear errors for files that are not usable, the llama.cpp -> HF
renaming of config keys and tensor names, and undoing the one layout change llama.cpp's converter makes to
weights (the q/k row permutation).

Shapes: everything returned here is in torch/numpy order (outermost first), so a linear weight is
`[out_features, in_features]` as in HF checkpoints. The GGUF header stores dimensions innermost first
(`[in_features, out_features]`); it is reversed once, when the header is parsed.
"""

from __future__ import annotations

import math
import os
import re
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch

from turboinfer.errors import ModelLoadError, ModelNotFoundError, UnsupportedModelError
from turboinfer.loader.gguf_dequant import BLOCK_SIZES, dequantize, type_name
from turboinfer.loader.gguf_parse import GGUFHeader, TensorInfo, read_array, read_header, read_tensor
from turboinfer.memory.gguf_header import LongArray

# GGUF general.architecture -> (HF class, HF model_type, q/k rows permuted by the converter).
# llama.cpp's converter permutes q/k only in its LlamaModel class (which also converts Mistral checkpoints);
# its Qwen2/Qwen3 classes write the checkpoint's rows as they are.
ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "mistral": ("MistralForCausalLM", "mistral", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False),
}

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_PER_LAYER = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Gemma 3 normalises each sublayer's output too; its "ffn_norm" is the MLP's input norm.
_GEMMA3_PER_LAYER = {**_PER_LAYER, "ffn_norm": "pre_feedforward_layernorm",
                     "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}
_PER_LAYER_BY_ARCH = {"gemma3": _GEMMA3_PER_LAYER}
# llama.cpp's converter stores Gemma's RMSNorm weights as 1 + w (its norm multiplies by the weight alone); the HF
# checkpoint, and so this loader's output, holds w.
_NORM_SHIFTED = {"gemma3"}
# Tensors that carry no parameter: llama.cpp's precomputed Llama-3 RoPE factors (read into rope_scaling).
_NOT_PARAMETERS = {"rope_freqs.weight"}


def gguf_to_hf_name(name: str, arch: str = "llama") -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for unknown names."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    per_layer = _PER_LAYER_BY_ARCH.get(arch, _PER_LAYER)
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in per_layer:
        return f"model.layers.{m.group(1)}.{per_layer[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk_rows(x, num_heads: int):
    """Undo llama.cpp's `LlamaModel.permute` on the rows of a q/k weight, bias or raw block matrix.

    The converter reorders each head's rows from HF's rotate-half layout (pairs (i, i + head_dim/2)) to
    ggml's interleaved one (pairs (2i, 2i+1)): rows viewed as [num_heads, 2, head_dim/2] are swapped to
    [num_heads, head_dim/2, 2]. Rows are whole output features, so this works on numpy or torch arrays,
    dequantized or still in quant blocks (blocks never cross rows)."""
    rows = x.shape[0]
    y = x.reshape(num_heads, rows // num_heads // 2, 2, *x.shape[1:]).swapaxes(1, 2)
    return y.reshape(x.shape)


def _f32(v) -> float:
    """GGUF stores floats as float32; print them as the config.json value they came from (1e-05, not
    9.999999747378752e-06). Same float32 either way, so computation is unaffected."""
    return float(str(np.float32(v)))


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
        self._entries: dict[str, TensorInfo] = {}  # hf name -> tensor
        self._unmapped: list[str] = []
        for t in self._header.tensors:
            if t.offset + t.nbytes > self._header.file_size:
                raise ModelLoadError(f"{self.path} is truncated: tensor {t.name} ends at byte {t.offset + t.nbytes} "
                                     f"but the file has {self._header.file_size}")
            hf = gguf_to_hf_name(t.name, self.architecture)
            if hf is not None:
                self._entries[hf] = t
            elif t.name not in _NOT_PARAMETERS:
                self._unmapped.append(t.name)
        self._gguf_names = {t.name for t in self._header.tensors}

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

    def _arch_entry(self) -> tuple[str, str, bool]:
        arch = self.architecture
        if arch not in ARCHITECTURES:
            raise UnsupportedModelError(f"GGUF architecture {arch or '<missing>'!r} in {self.path} is not supported "
                                        f"(supported: {', '.join(ARCHITECTURES)})")
        # llama.cpp converts Mistral as "llama"; only the model name tells (transformers reads it the same way)
        if arch == "llama" and "mistral" in str(self.metadata.get("general.name", "")).lower():
            return ARCHITECTURES["mistral"]
        return ARCHITECTURES[arch]

    def _uniform(self, key: str, default=None):
        """A per-model number that some files store per layer (an array); this engine needs it uniform."""
        v = self.metadata.get(f"{self.architecture}.{key}", default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise UnsupportedModelError(f"{self.path}: per-layer {key} values {sorted(set(v))} are not supported")
            v = v[0]
        return v

    def hf_config(self) -> dict[str, Any]:
        """The file's hyperparameters as an HF `config.json`-style dict (what `ModelArch.from_hf_config` reads)."""
        hf_class, model_type, _ = self._arch_entry()
        md = self.metadata
        missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
                   if f"{self.architecture}.{k}" not in md]
        if missing or "model.embed_tokens.weight" not in self._entries:
            what = ", ".join(f"{self.architecture}.{k}" for k in missing) or "token_embd.weight"
            raise ModelLoadError(f"{self.path} lacks {what}")
        hidden = int(self._uniform("embedding_length"))
        num_heads = int(self._uniform("attention.head_count"))
        head_dim = int(self._uniform("attention.key_length", hidden // num_heads))
        eos = md.get("tokenizer.ggml.eos_token_id")
        eot = md.get("tokenizer.ggml.eot_token_id")
        if eos is not None and eot is not None and eot != eos:
            eos = [eos, eot]  # chat models end a turn with EOT; either one stops generation
        return {
            "architectures": [hf_class],
            "model_type": model_type,
            "vocab_size": self._entries["model.embed_tokens.weight"].shape[0],
            "hidden_size": hidden,
            "intermediate_size": int(self._uniform("feed_forward_length")),
            "num_hidden_layers": int(self._uniform("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self._uniform("attention.head_count_kv", num_heads)),
            "head_dim": head_dim,
            "rms_norm_eps": _f32(self._uniform("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _f32(self._uniform("rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(head_dim),
            "max_position_embeddings": int(self._uniform("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in self._gguf_names,
            "attention_bias": "blk.0.attn_q.bias" in self._gguf_names,
            "hidden_act": "silu",
            "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos,
            "torch_dtype": self._torch_dtype(),
            **(self._gemma3_config(head_dim) if self.architecture == "gemma3" else {}),
        }

    def _gemma3_config(self, head_dim: int) -> dict[str, Any]:
        """What llama.cpp's gemma3 graph fixes in code rather than in the file: every 6th layer is global, the
        sliding layers use RoPE base 10,000, queries are scaled by head_dim^-1/2 (query_pre_attn_scalar =
        head_dim for the 270M, 1B, 4B and 12B checkpoints; 27B, which scales by hidden/heads, is refused)."""
        num_layers = int(self._uniform("block_count"))
        num_heads = int(self._uniform("attention.head_count"))
        hidden = int(self._uniform("embedding_length"))
        if num_layers == 62 and hidden // num_heads != head_dim:
            raise UnsupportedModelError(f"{self.path}: Gemma 3 27B (query scale hidden/heads) is not supported")
        pattern = self.metadata.get("gemma3.attention.sliding_window_pattern")
        if isinstance(pattern, list):  # newer converters: one flag per layer, true where the layer slides
            types = ["sliding_attention" if p else "full_attention" for p in pattern]
        else:
            n = int(pattern or 6)
            types = ["full_attention" if (i + 1) % n == 0 else "sliding_attention" for i in range(num_layers)]
        cap = self.metadata.get("gemma3.final_logit_softcapping")
        return {"hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
                "sliding_window": int(self._uniform("attention.sliding_window", 512)), "layer_types": types,
                "rope_local_base_freq": _f32(self.metadata.get("gemma3.rope.freq_base_swa", 10000.0)),
                "query_pre_attn_scalar": head_dim, "final_logit_softcapping": _f32(cap) if cap else None}

    def _rope_scaling(self, head_dim: int) -> dict | None:
        kind = self._uniform("rope.scaling.type")
        factor = self._uniform("rope.scaling.factor")
        if kind == "linear" and factor:
            return {"rope_type": "linear", "factor": _f32(factor)}
        if kind == "yarn" and factor:
            s = {"rope_type": "yarn", "factor": _f32(factor)}
            for gguf_key, hf_key in (("rope.scaling.original_context_length", "original_max_position_embeddings"),
                                     ("rope.scaling.yarn_beta_fast", "beta_fast"),
                                     ("rope.scaling.yarn_beta_slow", "beta_slow")):
                if (v := self._uniform(gguf_key)) is not None:
                    s[hf_key] = _f32(v) if isinstance(v, float) else v
            return s
        if kind not in (None, "none", "linear", "yarn"):
            raise UnsupportedModelError(f"{self.path}: RoPE scaling type {kind!r} is not supported")
        if "rope_freqs.weight" in self._gguf_names:
            return self._llama3_scaling(head_dim)
        return None

    def _llama3_scaling(self, head_dim: int) -> dict:
        """Llama 3.1+ files carry no rope_scaling keys; the converter bakes the factors into a `rope_freqs`
        tensor [head_dim/2] (each frequency is divided by its factor). Recover HF's llama3 parameters: the
        largest factor is `factor`; the band edges are checked against the values every Llama 3.x release
        uses (low 1, high 4, original context 8192) by recomputing the factors the converter's way."""
        t = next(t for t in self._header.tensors if t.name == "rope_freqs.weight")
        got = dequantize(read_tensor(self.path, t), t.qtype, (t.numel,)).double()
        theta = float(self._uniform("rope.freq_base", 10000.0))
        factor, low, high, old = _f32(got.max().item()), 1.0, 4.0, 8192
        wavelen = 2 * math.pi * theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        smooth = (old / wavelen - low) / (high - low)
        want = torch.where(wavelen < old / high, 1.0,
                           torch.where(wavelen > old / low, factor, 1 / ((1 - smooth) / factor + smooth)))
        if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-4):
            raise UnsupportedModelError(f"{self.path}: its rope_freqs tensor does not match Llama-3 RoPE scaling")
        s = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
             "original_max_position_embeddings": old}
        return s

    def _torch_dtype(self) -> str:
        # general.file_type is llama.cpp's LLAMA_FTYPE: 0 all F32, 1 mostly F16, 32 mostly BF16; quantized
        # files keep their block scales in fp16, the closest match among torch dtypes.
        return {0: "float32", 1: "float16", 32: "bfloat16"}.get(self.metadata.get("general.file_type"), "float16")

    # ---- tensors ------------------------------------------------------------------------------------------

    def tensor_names(self) -> list[str]:
        """HF names of the file's parameters, in file order."""
        return list(self._entries)

    def check_mapped(self) -> None:
        self._arch_entry()
        if self._unmapped:
            raise UnsupportedModelError(f"{self.path}: tensor(s) {', '.join(self._unmapped[:5])} have no "
                                        f"equivalent in the {self.architecture} model")

    def _qk_heads(self, hf_name: str) -> int | None:
        """Head count to un-permute this tensor's rows with, or None when it is stored as HF stores it."""
        _, _, permuted = self._arch_entry()
        if not permuted:
            return None
        if ".self_attn.q_proj." in hf_name:
            return int(self._uniform("attention.head_count"))
        if ".self_attn.k_proj." in hf_name:
            return int(self._uniform("attention.head_count_kv", self._uniform("attention.head_count")))
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
        if self.architecture in _NORM_SHIFTED and hf_name.endswith("norm.weight"):
            t = t.float() - 1
        return t.to(dtype)

    def iter_tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, dequantized tensor in HF layout) for every parameter, one at a time."""
        self.check_mapped()
        for hf_name in self._entries:
            yield hf_name, self.get_tensor(hf_name, dtype)
