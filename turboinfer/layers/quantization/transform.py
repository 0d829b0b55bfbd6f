"""Quantize a loaded float model in place: every Linear except the output head gets a quantized method and loses
its dense weight. Embeddings and lm_head stay float (the logits are the most rounding-sensitive matmul, and a
tied head is the embedding table)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from turboinfer.layers.quantization.awq import InputStats, quantize_awq
from turboinfer.layers.quantization.int8 import Int8Weight, quantize_int8
from turboinfer.layers.quantization.q4 import KERNEL_GROUP_SIZES, Q4Weight, quantize_q4

logger = logging.getLogger("turboinfer")

METHODS = ("none", "int8", "int4")
SKIP = ("lm_head",)  # module names (last component) left float


def layer_group_size(in_features: int, requested: int) -> int | None:
    """The requested group size, or the largest smaller kernel size that divides in_features (e.g. 64 for a
    576-wide layer asked for 128); None when not even 32 divides it."""
    for g in sorted(KERNEL_GROUP_SIZES, reverse=True):
        if g <= requested and in_features % g == 0:
            return g
    return None


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Float Linears with a dense weight, by module name (already-packed GGUF layers are not touched)."""
    from turboinfer.layers.linear import Linear, UnquantizedMethod

    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, Linear) and isinstance(m.quant_method, UnquantizedMethod) and m.weight.numel()
            and name.rsplit(".", 1)[-1] not in SKIP]


def quantize_weight(w: torch.Tensor, method: str, group_size: int,
                    stats: InputStats | None = None) -> Int8Weight | Q4Weight | None:
    """w: [N, K] dense. None: this layer stays float (no int4 group size divides K)."""
    if method == "int8":
        return quantize_int8(w)
    if method != "int4":
        raise ValueError(f"quantization {method!r} is not one of {', '.join(METHODS)}")
    g = layer_group_size(w.shape[1], group_size)
    if g is None:
        return None
    return quantize_q4(w, g) if stats is None else quantize_awq(w, stats, g)


def quantize_model(model: nn.Module, method: str, group_size: int, device: torch.device,
                   stats: dict[str, InputStats] | None = None) -> dict[str, Int8Weight | Q4Weight]:
    """Quantize every eligible Linear in place (AWQ when `stats` is given); returns the quantized weights by
    module name, which is what a quantized checkpoint stores."""
    from turboinfer.layers.quantization import quant_method_for

    out = {}
    for name, layer in quantizable_linears(model):
        qw = quantize_weight(layer.weight.data, method, group_size, None if stats is None else stats[name])
        if qw is None:
            logger.warning("%s: in_features %d has no int4 group size dividing it; left unquantized", name,
                           layer.in_features)
            continue
        layer.quant_method = quant_method_for(qw, device)
        layer.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)  # free the dense copy
        out[name] = qw
    return out
