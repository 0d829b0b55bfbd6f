"""Architecture name -> model class. One file per family; the Llama family covers four HF classes."""

from __future__ import annotations

from torch import nn

from turboinfer.config import LLAMA_FAMILY, ModelArch
from turboinfer.errors import UnsupportedModelError


def build_model(arch: ModelArch) -> nn.Module:
    if arch.architecture in LLAMA_FAMILY:
        from turboinfer.models.llama import LlamaForCausalLM

        return LlamaForCausalLM(arch)
    raise UnsupportedModelError(f"architecture {arch.architecture!r} is not supported")
