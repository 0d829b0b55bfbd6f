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
        # Statistics in float32 whatever the compute dtype, as the HF reference does.
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32:  # one fused op; same arithmetic as the reference in float32
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:  # as HF: normalise in float32, round to the compute dtype, then scale
            xf = x.float()
            out = self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return out if residual is None else (out, residual)
