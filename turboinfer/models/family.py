"""`ModelFamily`: everything the engine knows about one model family, in one place. The loader reads a
family's GGUF names and config translation from it, the memory estimator its shape facts, the runner whether the
C decode step covers it, and `build_model` its class.

Descriptors are plain data and functions with no torch import: the model class is named by an import string and
imported only when a model is built, so the registry, the loader's config path and the estimator stay torch-free.
Each family's descriptor lives in `models/<family>_family.py`, beside its model code in `models/<family>.py`."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from turboinfer.errors import UnsupportedModelError
from turboinfer.models.arch import ModelArch
from turboinfer.models.gguf_config import GGUFSource, hf_tensor_name


@dataclass(frozen=True, eq=False)  # one instance per family: compared and hashed by identity
class ModelFamily:
    name: str  # "llama" | "gemma3": how messages and tests name the family
    hf_architectures: dict[str, str]  # HF class (config.json "architectures") -> its model_type
    parse_config: Callable[[dict[str, Any]], ModelArch]  # an HF config.json dict of one of those classes
    gguf_architectures: tuple[str, ...]  # llama.cpp `general.architecture` values the family reads
    gguf_config: Callable[[GGUFSource], dict[str, Any]]  # GGUF metadata -> HF config.json-style dict
    gguf_layer_tensors: dict[str, str]  # llama.cpp per-layer tensor key (blk.N.<key>) -> HF module path
    gguf_qk_permuted: frozenset[str]  # GGUF architectures whose converter permuted q/k rows (undone at load)
    gguf_norm_offset: float  # the converter stores each RMSNorm weight as w + this (Gemma's 1 + w); loads w
    model_class: str  # "module:Class" of the torch model, imported by `load_model_class` only
    norms_per_layer: int  # hidden-width RMSNorms per decoder layer (the estimator's parameter inventory)
    has_c_decode_step: bool  # kernels/cpu/decode.c implements this family's layer (runner/cpu_decode.py)

    def hf_tensor_name(self, gguf_name: str) -> str | None:
        """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for names the family lacks."""
        return hf_tensor_name(gguf_name, self.gguf_layer_tensors)

    def load_model_class(self) -> type:
        module, cls = self.model_class.split(":")
        return getattr(importlib.import_module(module), cls)


def hf_architecture(family: ModelFamily, cfg: dict[str, Any]) -> str:
    """The config's HF class, which the registry has already matched to `family`."""
    archs = cfg.get("architectures") or []
    if archs:
        return archs[0]
    return next(a for a, t in family.hf_architectures.items() if t == cfg.get("model_type"))


def require_fields(cfg: dict[str, Any]) -> None:
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise UnsupportedModelError(f"model config lacks required field(s): {', '.join(missing)}")


def eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    return tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())


def saved_dtype(cfg: dict[str, Any]) -> str:
    return str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32").replace("torch.", "")
