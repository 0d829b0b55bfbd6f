"""Architecture name -> model class. One file per family; the Llama family covers four HF classes, Gemma 3 one."""

from __future__ import annotations

from torch import nn

from turboinfer.config import GEMMA3_FAMILY, LLAMA_FAMILY, ModelArch
from turboinfer.errors import UnsupportedModelError


def build_model(arch: ModelArch, device=None, dtype=None) -> nn.Module:
    """The model with uninitialised parameters created directly on `device` in `dtype` (weights load later)."""
    import torch

    if arch.architecture in LLAMA_FAMILY:
        from turboinfer.models.llama import LlamaForCausalLM as cls
    elif arch.architecture in GEMMA3_FAMILY:
        from turboinfer.models.gemma3 import Gemma3ForCausalLM as cls
    else:
        raise UnsupportedModelError(f"architecture {arch.architecture!r} is not supported")

    prev = torch.get_default_dtype()
    with torch.device(device or "cpu"):
        torch.set_default_dtype(dtype or prev)
        try:
            return cls(arch)
        finally:
            torch.set_default_dtype(prev)
