"""RMSNorm, optionally fused with the residual add that precedes it (one pass instead of two)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is not None:
            x = x + residual
            residual = x
        # One fused op (statistics in float32 for reduced-precision inputs). In float32 it is the reference's
        # arithmetic; in bf16 it rounds once at the end where HF rounds before the weight multiply.
        out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return out if residual is None else (out, residual)
