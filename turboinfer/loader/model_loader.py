"""Turn a resolved model (HF directory or GGUF file) into a config, a loaded torch model and a tokenizer."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterator

import torch

from turboinfer.errors import InvalidRequestError, ModelLoadError, UnsupportedModelError
from turboinfer.loader.resolve import ResolvedModel
from turboinfer.models.arch import ModelArch
from turboinfer.models.registry import arch_from_hf_config


def read_hf_config(model_dir: str) -> dict:
    # A bare JSON file (any name) is accepted too: --load-format dummy builds a model from the config alone.
    path = Path(model_dir) if os.path.isfile(model_dir) else Path(model_dir) / "config.json"
    model_dir = str(path.parent)
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
    """The model's numbers; a GGUF file's metadata is first translated into an HF config by its family, so both
    formats go through the same parse."""
    if resolved.kind == "gguf":
        from turboinfer.loader.gguf_file import GGUFFile

        return arch_from_hf_config(GGUFFile(resolved.path).hf_config())
    return arch_from_hf_config(read_hf_config(resolved.path))


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


# A Q8_0 token embedding is kept as its own regrouped table (the fastest tied logits: int8 multiply-adds per group
# of 32, 16 rows at a time); False sends it down the general int8 path that Q6_K / Q5_K tables take (tests use it).
Q8_0_TABLE = True


def iter_gguf(path: str, keep_packed: bool, packed_embedding: bool = True) -> Iterator[tuple[str, object]]:
    """GGUF parameters by HF name. With keep_packed, linear weights stay quantized: 4-bit types as Q4Weight (packed
    int4 matmul), Q8_0 / Q5_K / Q6_K as GroupedInt8Weight (int8 codes), a Q8_0 embedding as its blocks; everything
    else is dequantized to float32. `packed_embedding`: whether a Q8_0 / Q6_K / Q5_K embedding may stay packed
    (CPU: lookups dequantize their rows, a tied output projection runs the int8 kernels)."""
    from turboinfer.layers.embedding import Q8_0, PackedQ8_0
    from turboinfer.layers.quantization.grouped_int8 import GROUPED_INT8_TYPES, decompose_grouped_int8
    from turboinfer.layers.quantization.q4 import Q4_TYPES, decompose_q4
    from turboinfer.loader.gguf_file import GGUFFile

    f = GGUFFile(path)
    if not keep_packed:
        yield from f.iter_tensors(torch.float32)
        return
    f.check_mapped()
    for name in f.tensor_names():
        qtype, raw, shape = f.raw_tensor(name)
        linear = (name.endswith("proj.weight") or name == "lm_head.weight") and len(shape) == 2
        if qtype in Q4_TYPES and linear:
            yield name, decompose_q4(qtype, raw, shape)
        elif qtype in GROUPED_INT8_TYPES and linear:
            yield name, decompose_grouped_int8(qtype, raw, shape)
        elif qtype == Q8_0 and name == "model.embed_tokens.weight" and packed_embedding and Q8_0_TABLE:
            yield name, PackedQ8_0(raw, shape)
        elif qtype in GROUPED_INT8_TYPES and name == "model.embed_tokens.weight" and packed_embedding:
            yield name, decompose_grouped_int8(qtype, raw, shape)  # Q6_K / Q5_K tables (Q4_K_M files)
        else:
            yield name, f.get_tensor(name, torch.float32)


def checkpoint_quantization(resolved: ResolvedModel) -> dict | None:
    """The quantization_config of a quantized HF directory (written by `turboinfer quantize`); None for float
    checkpoints, bare config files and GGUF."""
    if resolved.kind == "gguf" or not os.path.isdir(resolved.path):
        return None
    qcfg = read_hf_config(resolved.path).get("quantization_config")
    if not qcfg:
        return None
    from turboinfer.layers.quantization.checkpoint import QUANT_METHOD

    if qcfg.get("quant_method") != QUANT_METHOD:
        raise UnsupportedModelError(
            f"{resolved.path} is quantized with {qcfg.get('quant_method')!r}, which turboinfer cannot read; load the "
            f"float model (optionally with --quantization int8|int4) or one written by `turboinfer quantize`")
    return qcfg


def check_quantization(resolved: ResolvedModel, method: str, group_size: int, awq: bool,
                       gptq: bool = False) -> None:
    """--quantization applies to float checkpoints; fail before loading anything when it cannot."""
    if method == "none":
        return
    if resolved.kind == "gguf":
        raise InvalidRequestError(f"--quantization {method}: {resolved.display_name} is a GGUF file, whose weights "
                                  "are already quantized; drop --quantization (or load a float safetensors model)")
    stored = checkpoint_quantization(resolved)
    if stored is not None:
        from turboinfer.layers.quantization.checkpoint import quantization_config

        if quantization_config(method, group_size, awq, gptq) != stored:
            raise InvalidRequestError(f"--quantization {method}: {resolved.display_name} is already quantized "
                                      f"({stored}); load it without --quantization")


def load_weights_into(model: torch.nn.Module, resolved: ResolvedModel, device: torch.device,
                      keep_packed: bool = True) -> int:
    """Load every parameter; returns the number of linear layers left quantized."""
    from turboinfer.layers.linear import finalize_quantized

    if resolved.kind == "gguf":
        # CPU: torch's int4 kernel and the C int8 kernel; CUDA: the Triton dequant-matmuls (the embedding table
        # is dequantized there)
        weights = iter_gguf(resolved.path, keep_packed and device.type in ("cpu", "cuda"),
                            packed_embedding=device.type == "cpu")
    else:
        weights = iter_safetensors(resolved.path)
        qcfg = checkpoint_quantization(resolved)
        if qcfg is not None:
            from turboinfer.layers.quantization.checkpoint import group_quantized

            weights = group_quantized(weights, qcfg)
    packed = [0]
    model.load_weights(_pack_layers_as_loaded(model, weights, device, packed))
    return packed[0] + finalize_quantized(model, device)


_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.")


def _pack_layers_as_loaded(model: torch.nn.Module, weights: Iterator[tuple[str, object]], device: torch.device,
                           packed: list[int]) -> Iterator[tuple[str, object]]:
    """Pass `weights` through; when the checkpoint moves on from decoder layer i, pack that layer's quantized
    shards at once. Waiting for the end would hold every layer's unpacked codes (1.25 bytes per weight, twice
    the packed size) at the same time: that was most of the load peak, and the heap it left fragmented stayed
    resident. A layer still missing a shard (files not ordered by layer) is left to the final pass."""
    from turboinfer.layers.linear import Linear, finalize_quantized

    current = None
    for name, tensor in weights:
        m = _LAYER_RE.match(name)
        idx = int(m.group(1)) if m else None
        if current is not None and idx != current:
            layer = model.get_submodule(f"model.layers.{current}")
            if all(set(mod.pending_quantized) == set(mod.shard_sizes)
                   for mod in layer.modules() if isinstance(mod, Linear) and mod.pending_quantized):
                packed[0] += finalize_quantized(layer, device)
        current = idx
        yield name, tensor


def quantize_loaded(model: torch.nn.Module, resolved: ResolvedModel, device: torch.device, method: str,
                    group_size: int, awq: bool, tokenizer=None, gptq: bool = False) -> dict:
    """--quantization on a float checkpoint: quantize the just-loaded model's Linears in place (AWQ: after one
    calibration pass of the float model over the first passage of the built-in text; GPTQ, alone or after AWQ's
    scales: layer by layer over all of that text). Returns the quantized weights by module name; nothing happens
    for "none" or a checkpoint that is quantized already."""
    if method == "none" or checkpoint_quantization(resolved) is not None:
        return {}
    from turboinfer.layers.quantization.awq import MAX_CALIBRATION_TOKENS, calibration_segments, collect_input_stats
    from turboinfer.layers.quantization.transform import quantize_model

    stats = None
    if awq or gptq:
        segments = calibration_segments(tokenizer, min(MAX_CALIBRATION_TOKENS, model.arch.max_position_embeddings))
    if gptq:
        from turboinfer.layers.quantization.gptq import quantize_model_gptq

        return quantize_model_gptq(model, segments, group_size, device, awq=awq)
    if awq:
        # AWQ's scale search reads only the first passage: on SmolLM2-135M at group 64, statistics from the whole
        # text raised the KL from float over benchmarks/data/lighthouses.txt from 0.091 to 0.098.
        stats = collect_input_stats(model, segments[0])
    return quantize_model(model, method, group_size, device, stats)


def resolve_for_load(name: str | None, load_format: str) -> ResolvedModel:
    """Like resolve_model, but --load-format dummy also takes a path to a config JSON file."""
    from turboinfer.loader.resolve import resolve_model

    path = os.path.expanduser(name or "")
    if load_format == "dummy" and os.path.isfile(path) and path.endswith(".json"):
        return ResolvedModel("hf_dir", os.path.abspath(path), Path(path).parent.name or Path(path).stem)
    return resolve_model(name)


def init_dummy_weights(model: torch.nn.Module, seed: int = 0) -> None:
    """--load-format dummy: no checkpoint is read. Matrices ~ N(0, 0.02) (the usual init scale, so activations
    stay finite through any depth), norm weights 1, biases 0. Speed does not depend on the values."""
    gens: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                g = gens.setdefault(p.device, torch.Generator(p.device).manual_seed(seed))
                p.normal_(0.0, 0.02, generator=g)
            elif "norm" in name:
                p.fill_(1.0)
            else:
                p.zero_()


def placeholder_tokenizer(arch: ModelArch):
    """A tokenizer for a config without one (--load-format dummy): token i is the word "<i>". Benchmarks feed
    such models token-id prompts; this only lets the engine decode what it generates."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    from turboinfer.tokenizer.tokenizer import Tokenizer

    tok = RustTokenizer(models.WordLevel({f"<{i}>": i for i in range(arch.vocab_size)}, unk_token="<0>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    eos = arch.eos_token_ids[0] if arch.eos_token_ids else None
    return Tokenizer(tok, bos_token_id=arch.bos_token_id, eos_token_id=eos, extra_eos_ids=arch.eos_token_ids,
                     name="placeholder")


def load_tokenizer(resolved: ResolvedModel, arch: ModelArch | None = None):
    """The model's tokenizer; given `arch`, a directory without tokenizer.json gets a placeholder instead of
    an error (--load-format dummy)."""
    from turboinfer.tokenizer.tokenizer import Tokenizer

    if resolved.kind != "gguf" and os.path.isfile(resolved.path):  # a bare config file
        resolved = ResolvedModel(resolved.kind, os.path.dirname(resolved.path), resolved.display_name)
    if arch is not None and resolved.kind != "gguf" and \
            not os.path.isfile(os.path.join(resolved.path, "tokenizer.json")):
        return placeholder_tokenizer(arch)
    if resolved.kind == "gguf":
        from turboinfer.loader.gguf_file import GGUFFile

        return Tokenizer.from_gguf(GGUFFile(resolved.path))
    return Tokenizer.from_dir(resolved.path)
