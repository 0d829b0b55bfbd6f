"""Turn a resolved model (HF directory or GGUF file) into a config, a loaded torch model and a tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

import torch

from turboinfer.config import ModelArch
from turboinfer.errors import ModelLoadError
from turboinfer.loader.resolve import ResolvedModel


def read_hf_config(model_dir: str) -> dict:
    path = Path(model_dir) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{model_dir} has no config.json; is it a Hugging Face model directory?") from None
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path} is not valid JSON: {e}") from None
    gen = Path(model_dir) / "generation_config.json"
    if gen.exists():  # generation_config's EOS list (e.g. Llama 3's <|eot_id|>) takes precedence
        try:
            eos = json.loads(gen.read_text()).get("eos_token_id")
        except json.JSONDecodeError:
            eos = None
        if eos is not None:
            cfg["eos_token_id"] = eos
    return cfg


def load_arch(resolved: ResolvedModel) -> ModelArch:
    if resolved.kind == "gguf":
        from turboinfer.loader.gguf_file import GGUFFile

        return ModelArch.from_hf_config(GGUFFile(resolved.path).hf_config())
    return ModelArch.from_hf_config(read_hf_config(resolved.path))


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    index = Path(model_dir) / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in Path(model_dir).glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{model_dir} has no .safetensors weights (.bin checkpoints are not supported)")
    for name in files:
        path = os.path.join(model_dir, name)
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        except (OSError, RuntimeError) as e:  # safetensors raises SafetensorError (a RuntimeError) on corruption
            raise ModelLoadError(f"cannot read {path}: {e}") from None


def iter_gguf(path: str, keep_packed: bool) -> Iterator[tuple[str, object]]:
    """GGUF parameters by HF name. With keep_packed, 4-bit linear weights come as Q4Weight (packed matmul);
    everything else, and embeddings always, is dequantized to float32."""
    from turboinfer.layers.embedding import Q8_0, PackedQ8_0
    from turboinfer.layers.quantization.q4 import Q4_TYPES, decompose_q4
    from turboinfer.loader.gguf_file import GGUFFile

    f = GGUFFile(path)
    if not keep_packed:
        yield from f.iter_tensors(torch.float32)
        return
    f.check_mapped()
    for name in f.tensor_names():
        qtype, raw, shape = f.raw_tensor(name)
        if qtype in Q4_TYPES and name.endswith("proj.weight") and len(shape) == 2:
            yield name, decompose_q4(qtype, raw, shape)
        elif qtype == Q8_0 and name == "model.embed_tokens.weight":
            yield name, PackedQ8_0(raw, shape)
        else:
            yield name, f.get_tensor(name, torch.float32)


def load_weights_into(model: torch.nn.Module, resolved: ResolvedModel, device: torch.device,
                      keep_packed: bool = True) -> int:
    """Load every parameter; returns the number of linear layers left quantized."""
    from turboinfer.layers.linear import finalize_quantized

    if resolved.kind == "gguf":
        weights = iter_gguf(resolved.path, keep_packed and device.type == "cpu")
    else:
        weights = iter_safetensors(resolved.path)
    model.load_weights(weights)
    return finalize_quantized(model, device)


def load_tokenizer(resolved: ResolvedModel):
    from turboinfer.tokenizer.tokenizer import Tokenizer

    if resolved.kind == "gguf":
        from turboinfer.loader.gguf_file import GGUFFile

        return Tokenizer.from_gguf(GGUFFile(resolved.path))
    return Tokenizer.from_dir(resolved.path)
