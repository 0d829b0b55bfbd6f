"""On-disk format of a quantized checkpoint (`turboinfer quantize`): safetensors with, for every quantized
checkpoint weight `<prefix>.weight` (per original q/k/v/gate/up shard, so models merge them as usual):

  <prefix>.qweight      int4: uint8 [N, K // 2], two codes a byte (low nibble: even column)
                        int8: int8 [N, K]
  <prefix>.scales       int4: float32 [N, K // group_size]      int8: float32 [N]
  <prefix>.zeros        int4 only: float32 [N, K // group_size] (w = q * scale + zero)
  <prefix>.input_scale  AWQ only: float32 [K], multiplied into x before the matmul

and config.json carries quantization_config = {"quant_method": "turboinfer", "bits": 4 | 8, "group_size", "awq"}
(plus "gptq": true for GPTQ, whose weights are stored like any int4 ones).
Everything else (embeddings, norms, lm_head, biases) is stored as in the float checkpoint. The stored values are
the ones quantizing at load computes, so loading the directory gives the same model without re-quantizing."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch

from turboinfer.errors import ModelLoadError
from turboinfer.layers.quantization.int8 import Int8Weight
from turboinfer.layers.quantization.q4 import Q4Weight

QUANT_METHOD = "turboinfer"
PARTS = ("qweight", "scales", "zeros", "input_scale")


def quantization_config(method: str, group_size: int, awq: bool, gptq: bool = False) -> dict:
    bits = {"int8": 8, "int4": 4}[method]
    cfg = {"quant_method": QUANT_METHOD, "bits": bits, "group_size": group_size if bits == 4 else -1, "awq": awq}
    return {**cfg, "gptq": True} if gptq else cfg


def to_tensors(prefix: str, w: Int8Weight | Q4Weight) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized weight; prefix is its checkpoint name without `.weight`. Copies: the
    shards of a merged layer are views of one tensor, and safetensors refuses to save shared storage."""
    if isinstance(w, Int8Weight):
        return {f"{prefix}.qweight": w.q.clone(), f"{prefix}.scales": w.scale.float().clone()}
    q = w.q.to(torch.uint8)
    out = {f"{prefix}.qweight": (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(),
           f"{prefix}.scales": w.scale.float().clone(), f"{prefix}.zeros": w.zero.float().clone()}
    if w.input_scale is not None:
        out[f"{prefix}.input_scale"] = w.input_scale.float().clone()
    return out


def from_tensors(parts: dict[str, torch.Tensor], bits: int) -> Int8Weight | Q4Weight:
    """Inverse of to_tensors; parts are keyed by the suffix (qweight, scales, ...)."""
    if bits == 8:
        return Int8Weight(parts["qweight"], parts["scales"])
    packed = parts["qweight"]
    n = packed.shape[0]
    q = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(n, -1)  # [N, K]
    k = q.shape[1]
    group_size = k // parts["scales"].shape[1]
    return Q4Weight(q, parts["scales"], parts["zeros"], group_size, parts.get("input_scale"))


def group_quantized(weights: Iterable[tuple[str, torch.Tensor]], qcfg: dict) -> Iterator[tuple[str, object]]:
    """Turn a quantized checkpoint's tensors back into (`<prefix>.weight`, Int8Weight | Q4Weight) pairs; other
    tensors pass through. A weight's parts may arrive in any order (and from any file of the checkpoint)."""
    bits = int(qcfg.get("bits", 0))
    if bits not in (4, 8):
        raise ModelLoadError(f"quantization_config bits={qcfg.get('bits')!r}: only 4 and 8 are supported")
    need = {"qweight", "scales"} | ({"zeros"} if bits == 4 else set()) | \
        ({"input_scale"} if bits == 4 and qcfg.get("awq") else set())
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in weights:
        prefix, _, suffix = name.rpartition(".")
        if suffix not in PARTS:
            yield name, tensor
            continue
        parts = pending.setdefault(prefix, {})
        parts[suffix] = tensor
        if need <= parts.keys():
            yield f"{prefix}.weight", from_tensors(pending.pop(prefix), bits)
    if pending:
        prefix, parts = next(iter(pending.items()))
        raise ModelLoadError(f"quantized checkpoint is incomplete: {prefix} has only {sorted(parts)} "
                             f"({len(pending)} weight(s) affected)")
