"""Architecture name -> model class. One file per family; the Llama family covers four HF classes."""

from __future__ import annotations

from torch import nn

from turboinfer.config import LLAMA_FAMILY, ModelArch
from turboinfer.errors import UnsupportedModelError


def build_model(arch: ModelArch, device=None, dtype=None) -> nn.Module:
    """The model with uninitialised parameters created directly on `device` in `dtype` (weights load later)."""
    import torch

    if arch.architecture not in LLAMA_FAMILY:
        raise UnsupportedModelError(f"architecture {arch.architecture!r} is not supported")
    from turboinfer.models.llama import LlamaForCausalLM

    prev = torch.get_default_dtype()
    with torch.device(device or "cpu"):
        torch.set_default_dtype(dtype or prev)
        try:
            return LlamaForCausalLM(arch)
        finally:
            torch.set_default_dtype(prev)
