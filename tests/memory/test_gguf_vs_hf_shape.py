"""One model, one shape: the estimator reads a Gemma 3 GGUF header through the family's GGUF translation and
parse (the loader's), so it gives the figures it gives for the HF config of the same model, and the engine's
loaded config agrees with both. 18 layers as in Gemma 3 270M: five sliding-window layers to one global."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gguf_writer import write_gguf_file
from turboinfer.loader.model_loader import load_arch
from turboinfer.loader.resolve import resolve_model
from turboinfer.memory import (estimate_inference, kv_bytes_for_sequences, kv_cache_bytes_per_token, model_shape,
                               num_params, read_gguf_header, shape_from_gguf, shape_from_hf_config)
from turboinfer.models.gemma3_family import GEMMA3

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, VOCAB, WINDOW, CONTEXT = 18, 64, 4, 1, 16, 128, 256, 32, 512
WINDOWS = tuple(None if (i + 1) % 6 == 0 else WINDOW for i in range(LAYERS))  # layers 5, 11, 17 are global


def _hf_config():
    import transformers

    return transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM, query_pre_attn_scalar=HEAD_DIM,
        sliding_window=WINDOW, max_position_embeddings=CONTEXT, tie_word_embeddings=True)


def _gguf(path, pattern) -> str:
    """The converter's tensors (zeros: only shapes are read) and metadata; `pattern` None: an older file without
    gemma3.attention.sliding_window_pattern (llama.cpp's default of every sixth layer global applies)."""
    import transformers

    gguf_names = {hf: key for key, hf in GEMMA3.gguf_layer_tensors.items()}
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(_hf_config())
    tensors = {"token_embd.weight": np.zeros((VOCAB, HIDDEN), np.float32),
               "output_norm.weight": np.zeros(HIDDEN, np.float32)}
    for name, p in hf.named_parameters():
        if name.startswith("model.layers."):
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            module, kind = rest.rsplit(".", 1)
            tensors[f"blk.{layer}.{gguf_names[module]}.{kind}"] = np.zeros(tuple(p.shape), np.float32)
    kv = {"general.file_type": 0, "gemma3.embedding_length": HIDDEN, "gemma3.block_count": LAYERS,
          "gemma3.attention.head_count": HEADS, "gemma3.attention.head_count_kv": KV_HEADS,
          "gemma3.feed_forward_length": INTER, "gemma3.context_length": CONTEXT,
          "gemma3.attention.key_length": HEAD_DIM, "gemma3.attention.value_length": HEAD_DIM,
          "gemma3.attention.sliding_window": WINDOW, "gemma3.rope.freq_base": 1000000.0,
          "gemma3.attention.layer_norm_rms_epsilon": 1e-6}
    if pattern is not None:
        kv["gemma3.attention.sliding_window_pattern"] = pattern
    return write_gguf_file(path, "gemma3", tensors, kv)


@pytest.mark.parametrize("pattern", [None, [w is not None for w in WINDOWS]], ids=["default", "per-layer"])
def test_gemma3_gguf_and_hf_config_give_one_shape(tmp_path, pattern):
    path = _gguf(tmp_path / "gemma3.gguf", pattern)
    header = read_gguf_header(path)
    from_gguf, from_hf = shape_from_gguf(header), shape_from_hf_config(_hf_config().to_dict())
    assert from_gguf == from_hf
    assert from_gguf.norms_per_layer == 4 and from_gguf.qk_norm and from_gguf.layer_windows == WINDOWS
    assert model_shape(load_arch(resolve_model(path))) == from_gguf  # what the engine loads
    # every figure the estimator gives follows: parameters (= the file's tensors), KV per token and for sequences
    assert num_params(from_gguf) == num_params(from_hf) == sum(t.numel for t in header.tensors)
    for kv_dtype in ("auto", "int8"):
        assert kv_cache_bytes_per_token(from_gguf, kv_dtype, "bfloat16") == \
            kv_cache_bytes_per_token(from_hf, kv_dtype, "bfloat16") == LAYERS * 2 * KV_HEADS * \
            (HEAD_DIM * 2 if kv_dtype == "auto" else HEAD_DIM + 4)
    assert kv_bytes_for_sequences(from_gguf, 400, 3, 16) == kv_bytes_for_sequences(from_hf, 400, 3, 16)
    est = [estimate_inference(s, dtype="float32", max_model_len=400, max_num_seqs=3, device="cpu").to_dict()
           for s in (from_gguf, from_hf)]
    assert est[0] == est[1]
