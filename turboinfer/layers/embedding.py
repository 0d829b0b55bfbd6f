"""Token embedding that can double as the (tied) output projection: dense, kept as GGUF Q8_0 blocks, or as int8
codes with group scales (GGUF Q6_K / Q5_K tables, see layers/quantization/grouped_int8.py).

Q8_0 stores w = q * d with q int8 and one d per 32 weights. Kept that way the table costs 1.06 bytes a weight
instead of 2 (bf16), a lookup dequantizes only the rows it needs, and the output projection reads the int8
codes directly: x W^T = sum over groups g of d_g * (x_g q_g^T), one int8 matmul per group of 32 input
features (torch's per-channel int8 kernel, with d_g as the channel scale)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from turboinfer.errors import ModelLoadError

Q8_0 = 8  # GGMLQuantizationType
GROUP = 32


class PackedQ8_0:
    """A Q8_0 tensor as stored in a GGUF file, handed to VocabEmbedding unconverted."""

    def __init__(self, raw: np.ndarray, shape: tuple[int, int]) -> None:
        self.raw, self.shape = raw, tuple(shape)


def decompose_q8_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (codes int8 [K // 32, N, 32], d float16 [K // 32, N]) exactly as stored, regrouped so that each group of
    32 input features is one contiguous [N, 32] matrix (what the int8 kernel reads). The codes are copied once,
    straight from the blocks: the table is the largest tensor of a small model, so no intermediate copy."""
    n, k = shape
    # torch needs a writable array: the loader's fresh bytes are used as they are, a read-only map is copied
    blocks = torch.from_numpy(np.require(raw, np.uint8, ["C", "W"])).reshape(n, k // GROUP, 34).transpose(0, 1)
    d = blocks[..., :2].contiguous().view(torch.float16).squeeze(-1)
    return blocks[..., 2:].contiguous().view(torch.int8), d


class VocabEmbedding(nn.Module):
    bias = None  # read by a grouped_int8 method as the output projection's (absent) bias

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.codes: torch.Tensor | None = None  # [K // 32, N, 32] int8: each group's codes contiguous
        # [K // 32, N] float16: the file's own scales, exact (lookups and the C decode step read them; the int8
        # kernel gets one group's in bf16 at a time, so no second copy of all of them is kept)
        self.group_scales: torch.Tensor | None = None
        self.grouped_method = None  # a Q6_K / Q5_K table: its int8 method (weight .w), also the tied projection

    def weight_loader(self, param: nn.Parameter, loaded) -> None:
        if isinstance(loaded, PackedQ8_0):
            return self.load_q8_0(loaded.raw, loaded.shape)
        from turboinfer.layers.quantization.grouped_int8 import GroupedInt8Weight, grouped_int8_method

        if isinstance(loaded, GroupedInt8Weight):
            if tuple(loaded.shape) != tuple(self.weight.shape):
                raise ModelLoadError(f"embedding shape {tuple(loaded.shape)} does not match the model's "
                                     f"{tuple(self.weight.shape)}")
            self.grouped_method = grouped_int8_method(loaded, self.weight.device)
            self.weight = nn.Parameter(torch.empty(0, device=self.weight.device), requires_grad=False)
            return None
        if tuple(loaded.shape) != tuple(param.shape):
            raise ModelLoadError(f"embedding shape {tuple(loaded.shape)} does not match the model's "
                                 f"{tuple(param.shape)}")
        param.data.copy_(loaded)

    def load_q8_0(self, raw: np.ndarray, shape: tuple[int, int]) -> None:
        if tuple(shape) != tuple(self.weight.shape):
            raise ModelLoadError(f"embedding shape {tuple(shape)} does not match the model's "
                                 f"{tuple(self.weight.shape)}")
        codes, d = decompose_q8_0(raw, shape)
        dev = self.weight.device
        self.codes = codes.to(dev)
        self.group_scales = d.to(dev)
        self.weight = nn.Parameter(torch.empty(0, device=dev), requires_grad=False)

    @property
    def is_quantized(self) -> bool:
        """Kept as GGUF Q8_0 blocks (the layout the C decode step's Q8_0 logits read)."""
        return self.codes is not None

    def forward(self, ids: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.grouped_method is not None:
            w = self.grouped_method.w  # GroupedInt8Weight [vocab, hidden] on the device
            rows = type(w)(w.q[ids], w.scale[ids], None if w.zero is None else w.zero[ids], w.group_size)
            return rows.dequantize().to(dtype or torch.float32)
        if self.codes is None:
            return F.embedding(ids, self.weight)
        rows = self.codes[:, ids].float() * self.group_scales[:, ids, None].float()  # [K // 32, T, 32]
        return rows.permute(1, 0, 2).reshape(ids.shape[0], -1).to(dtype or torch.float32)

    def as_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [T, K] -> [T, vocab] with this table as the output projection (tied embeddings)."""
        if self.grouped_method is not None:
            return self.grouped_method.apply(self, hidden).float()
        if self.codes is None:
            return F.linear(hidden, self.weight)
        x = hidden.to(torch.bfloat16)  # torch's int8 kernel is vectorised for bf16 activations
        out = None
        for g in range(self.codes.shape[0]):
            part = torch.ops.aten._weight_int8pack_mm(x[:, g * GROUP:(g + 1) * GROUP], self.codes[g],
                                                      self.group_scales[g].to(torch.bfloat16))
            out = part.float() if out is None else out.add_(part)
        return out
