"""What llama.cpp's converters write, read back as HF names: GGUF metadata -> an HF config.json-style dict, and
GGUF tensor names -> HF parameter names. The parts every supported family shares live here; each family's
descriptor adds its own keys and per-layer names (models/llama_family.py, models/gemma3_family.py).

Both the loader (loader/gguf_file.py) and the memory estimator (memory/gguf_header.py) hand a family a
`GGUFSource`, so a GGUF file is understood one way. No torch, no numpy: the estimator reads headers only."""

from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass
from typing import Any, Callable

from turboinfer.errors import ModelLoadError, UnsupportedModelError

TOP_LEVEL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_TENSORS = {  # the Llama layout; families override what differs
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
# Tensors that carry config, not parameters: llama.cpp's precomputed Llama-3 RoPE factors (read into rope_scaling).
CONFIG_TENSORS = frozenset({"rope_freqs.weight"})
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(name: str, layer_tensors: dict[str, str]) -> str | None:
    if name in TOP_LEVEL_TENSORS:
        return TOP_LEVEL_TENSORS[name]
    m = _LAYER_RE.fullmatch(name)
    if m and m.group(2) in layer_tensors:
        return f"model.layers.{m.group(1)}.{layer_tensors[m.group(2)]}.{m.group(3)}"
    return None


@dataclass(frozen=True)
class GGUFSource:
    """A GGUF file as a family's translation reads it."""

    path: str  # for error messages
    metadata: dict[str, Any]  # every key/value of the header (long arrays as placeholders; none is read here)
    tensor_shapes: dict[str, tuple[int, ...]]  # GGUF tensor name -> numpy-order shape (outermost first)
    read_floats: Callable[[str], list[float]]  # a small tensor's values (only CONFIG_TENSORS are asked for)

    @property
    def arch(self) -> str:
        return str(self.metadata.get("general.architecture", ""))

    def uniform(self, key: str, default=None):
        """`<arch>.<key>`: a per-model number that some files store per layer (an array); the engine needs it
        uniform."""
        v = self.metadata.get(f"{self.arch}.{key}", default)
        if isinstance(v, list):
            if len(set(v)) != 1:
                raise UnsupportedModelError(f"{self.path}: per-layer {key} values {sorted(set(v))} are not supported")
            v = v[0]
        return v


def f32(v) -> float:
    """GGUF stores floats as float32; give back the config.json value they came from (1e-05, not
    9.999999747378752e-06): the shortest decimal that rounds to the same float32, as numpy prints it."""
    x = struct.unpack("<f", struct.pack("<f", v))[0]
    for digits in range(1, 10):
        s = float(f"{x:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", s))[0] == x:
            return s
    return x


def base_config(src: GGUFSource, hf_class: str, model_type: str) -> dict[str, Any]:
    """The keys every llama.cpp decoder-only architecture stores the same way."""
    md, arch, shapes = src.metadata, src.arch, src.tensor_shapes
    missing = [k for k in ("embedding_length", "block_count", "attention.head_count", "feed_forward_length")
               if f"{arch}.{k}" not in md]
    if missing or "token_embd.weight" not in shapes:
        what = ", ".join(f"{arch}.{k}" for k in missing) or "token_embd.weight"
        raise ModelLoadError(f"{src.path} lacks {what}")
    hidden = int(src.uniform("embedding_length"))
    num_heads = int(src.uniform("attention.head_count"))
    head_dim = int(src.uniform("attention.key_length", hidden // num_heads))
    eos = md.get("tokenizer.ggml.eos_token_id")
    eot = md.get("tokenizer.ggml.eot_token_id")
    if eos is not None and eot is not None and eot != eos:
        eos = [eos, eot]  # chat models end a turn with EOT; either one stops generation
    return {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(src.uniform("feed_forward_length")),
        "num_hidden_layers": int(src.uniform("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(src.uniform("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": f32(src.uniform("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": f32(src.uniform("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(src, head_dim),
        "max_position_embeddings": int(src.uniform("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": "blk.0.attn_q.bias" in shapes,
        "hidden_act": "silu",
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        # general.file_type is llama.cpp's LLAMA_FTYPE: 0 all F32, 1 mostly F16, 32 mostly BF16; quantized
        # files keep their block scales in fp16, the closest match among torch dtypes.
        "torch_dtype": {0: "float32", 1: "float16", 32: "bfloat16"}.get(md.get("general.file_type"), "float16"),
    }


def _rope_scaling(src: GGUFSource, head_dim: int) -> dict | None:
    kind = src.uniform("rope.scaling.type")
    factor = src.uniform("rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": f32(factor)}
    if kind == "yarn" and factor:
        s = {"rope_type": "yarn", "factor": f32(factor)}
        for gguf_key, hf_key in (("rope.scaling.original_context_length", "original_max_position_embeddings"),
                                 ("rope.scaling.yarn_beta_fast", "beta_fast"),
                                 ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if (v := src.uniform(gguf_key)) is not None:
                s[hf_key] = f32(v) if isinstance(v, float) else v
        return s
    if kind not in (None, "none", "linear", "yarn"):
        raise UnsupportedModelError(f"{src.path}: RoPE scaling type {kind!r} is not supported")
    if "rope_freqs.weight" in src.tensor_shapes:
        return _llama3_scaling(src, head_dim)
    return None


def _llama3_scaling(src: GGUFSource, head_dim: int) -> dict:
    """Llama 3.1+ files carry no rope_scaling keys; the converter bakes the factors into a `rope_freqs`
    tensor [head_dim/2] (each frequency is divided by its factor). Recover HF's llama3 parameters: the
    largest factor is `factor`; the band edges are checked against the values every Llama 3.x release
    uses (low 1, high 4, original context 8192) by recomputing the factors the converter's way."""
    got = src.read_floats("rope_freqs.weight")
    theta = float(src.uniform("rope.freq_base", 10000.0))
    factor, low, high, old = f32(max(got)), 1.0, 4.0, 8192
    want = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        smooth = (old / wavelen - low) / (high - low)
        want.append(1.0 if wavelen < old / high else factor if wavelen > old / low else
                    1 / ((1 - smooth) / factor + smooth))
    if len(got) != len(want) or any(abs(g - w) > 1e-8 + 1e-4 * abs(w) for g, w in zip(got, want)):
        raise UnsupportedModelError(f"{src.path}: its rope_freqs tensor does not match Llama-3 RoPE scaling")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low, "high_freq_factor": high,
            "original_max_position_embeddings": old}
