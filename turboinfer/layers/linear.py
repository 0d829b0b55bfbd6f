"""Linear layers whose weights load themselves. Merged layers (q|k|v, gate|up) take each checkpoint
shard into its row range, so one matmul replaces three. How the matmul is done is the layer's
`quant_method`: quantization swaps that object and leaves the model code alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from turboinfer.errors import ModelLoadError


class UnquantizedMethod:
    """Plain dense weight; the default for float checkpoints and dequantized GGUF."""

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Module):
    """y = x W^T + b with W stored [out_features, in_features] as in HF checkpoints.

    `shard_sizes` names the row blocks of a merged layer, e.g. {"q": 576, "k": 192, "v": 192}; a plain
    layer has a single unnamed shard.
    """

    def __init__(self, in_features: int, shard_sizes: dict[str | int, int] | int, bias: bool = False) -> None:
        super().__init__()
        self.shard_sizes = {None: shard_sizes} if isinstance(shard_sizes, int) else dict(shard_sizes)
        self.in_features = in_features
        self.out_features = sum(self.shard_sizes.values())
        # No random init: every element is overwritten by the loader (checked by load_weights).
        self.weight = nn.Parameter(torch.empty(self.out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.out_features), requires_grad=False) if bias else None
        self.quant_method = UnquantizedMethod()
        self.pending_quantized: dict = {}  # shard -> quantized weight awaiting finalize_quantized

    def shard_offset(self, shard: str | int | None) -> tuple[int, int]:
        offset = 0
        for name, size in self.shard_sizes.items():
            if name == shard:
                return offset, size
            offset += size
        raise KeyError(shard)

    def weight_loader(self, param: nn.Parameter, loaded, shard: str | int | None = None) -> None:
        if param is self.weight and not isinstance(loaded, torch.Tensor):
            # A quantized shard (e.g. layers.quantization.q4.Q4Weight): kept aside until every shard of this
            # layer is in, then `finalize_quantized` packs them into one quantized matrix.
            expected = (self.shard_sizes[shard], self.in_features)
            if tuple(loaded.shape) != expected:
                raise ModelLoadError(f"weight shape {tuple(loaded.shape)} does not match the model's {expected}")
            self.pending_quantized[shard] = loaded
            return
        offset, size = self.shard_offset(shard)
        target = param.data.narrow(0, offset, size)
        if tuple(loaded.shape) != tuple(target.shape):
            raise ModelLoadError(f"weight shape {tuple(loaded.shape)} does not match the model's "
                                 f"{tuple(target.shape)} (shard {shard}); is the config right for these weights?")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)


def finalize_quantized(model: nn.Module, device: torch.device) -> int:
    """Swap in a quantized method for every Linear that received quantized shards; returns how many.
    A layer must get all its shards in one format (a mix would need two matmuls)."""
    from turboinfer.layers.quantization import merge_shards, quant_method_for

    count = 0
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or not layer.pending_quantized:
            continue
        shards = [layer.pending_quantized.get(s) for s in layer.shard_sizes]
        if any(w is None for w in shards):
            raise ModelLoadError(f"{name}: some shards are quantized and others are not")
        try:
            merged = merge_shards(shards)
        except ValueError as e:
            raise ModelLoadError(f"{name}: {e}") from None
        layer.quant_method = quant_method_for(merged, device)
        layer.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)  # dense copy not kept
        layer.pending_quantized = {}
        count += 1
    return count
