"""Gated activations over a merged [gate | up] projection output."""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


def gated_act(x: torch.Tensor, act: str = "silu") -> torch.Tensor:
    # x: [num_tokens, 2 * intermediate] laid out as gate then up (see LlamaMLP.gate_up_proj)
    d = x.shape[-1] // 2
    return ACTIVATIONS[act](x[..., :d]) * x[..., d:]
