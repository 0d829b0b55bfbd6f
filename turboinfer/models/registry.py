"""The model families the engine runs, and the lookups that find one: by HF architecture (config.json), by HF
model_type, by GGUF `general.architecture`, or by a parsed ModelArch. Importing this module imports no torch:
descriptors name their model class by an import string (models/family.py), which `build_model` imports."""

from __future__ import annotations

from typing import Any

from turboinfer.errors import UnsupportedModelError
from turboinfer.models.arch import ModelArch
from turboinfer.models.family import ModelFamily
from turboinfer.models.gemma3_family import GEMMA3
from turboinfer.models.llama_family import LLAMA

FAMILIES: tuple[ModelFamily, ...] = (LLAMA, GEMMA3)

_BY_HF = {a: f for f in FAMILIES for a in f.hf_architectures}
_BY_MODEL_TYPE = {t: f for f in FAMILIES for t in f.hf_architectures.values()}
_BY_GGUF = {a: f for f in FAMILIES for a in f.gguf_architectures}
SUPPORTED_ARCHITECTURES = tuple(sorted(_BY_HF))  # for messages: the HF classes the engine runs
SUPPORTED_GGUF_ARCHITECTURES = tuple(_BY_GGUF)


def by_hf_architecture(name: str) -> ModelFamily | None:
    return _BY_HF.get(name)


def by_model_type(model_type: str) -> ModelFamily | None:
    return _BY_MODEL_TYPE.get(model_type)


def by_gguf_architecture(name: str) -> ModelFamily | None:
    return _BY_GGUF.get(name)


def family_of(arch: ModelArch) -> ModelFamily:
    family = _BY_HF.get(arch.architecture)
    if family is None:
        raise UnsupportedModelError(f"architecture {arch.architecture!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return family


def arch_from_hf_config(cfg: dict[str, Any]) -> ModelArch:
    """An HF config.json dict (any transformers version), or one translated from GGUF metadata -> ModelArch.
    The family is the first listed architecture's, or the model_type's when none is listed."""
    archs = cfg.get("architectures") or []
    family = by_hf_architecture(archs[0]) if archs else by_model_type(cfg.get("model_type", ""))
    if family is None:
        name = archs[0] if archs else cfg.get("model_type") or "<none>"
        raise UnsupportedModelError(f"architecture {name!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    return family.parse_config(cfg)


def build_model(arch: ModelArch, device=None, dtype=None):
    """The model (a torch nn.Module) with uninitialised parameters created directly on `device` in `dtype`
    (weights load later)."""
    import torch

    cls = family_of(arch).load_model_class()
    prev = torch.get_default_dtype()
    with torch.device(device or "cpu"):
        torch.set_default_dtype(dtype or prev)
        try:
            return cls(arch)
        finally:
            torch.set_default_dtype(prev)
