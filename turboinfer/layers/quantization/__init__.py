"""Quantized linear methods. A method owns how a Linear stores its weight and does its matmul. Quantized shards
reach a Linear two ways: from a checkpoint (GGUF 4-bit blocks, or a `turboinfer quantize` directory), through
`weight_loader` and then `finalize_quantized`; or from a float model quantized in place (`transform.py`).

  q4.py         4-bit group-wise weights (GGUF and round-to-nearest) and torch's int4 CPU kernel
  int8.py       8-bit per-channel weights and torch's int8 CPU kernel
  grouped_int8.py  GGUF Q8_0 / Q5_K / Q6_K as int8 codes with group scales, and their CPU kernel
  awq.py        activation-aware scale search for int4 (calibration pass + per-layer search)
  gptq.py       GPTQ for int4 (error-compensating rounding, calibrated layer by layer)
  transform.py  quantize a loaded float model's Linears
  checkpoint.py the on-disk format of quantized checkpoints"""

from __future__ import annotations

import torch


def quant_method_for(w, device: torch.device):
    """The matmul method for a quantized weight: the CPU kernel where it applies, else the PyTorch twin."""
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8Weight, grouped_int8_method
    from turboinfer.layers.quantization.int8 import Int8Weight, int8_method
    from turboinfer.layers.quantization.q4 import Q4Weight, q4_method

    if isinstance(w, Q4Weight):
        return q4_method(w, device)
    if isinstance(w, Int8Weight):
        return int8_method(w, device)
    if isinstance(w, GroupedInt8Weight):
        return grouped_int8_method(w, device)
    if isinstance(w, SplitWeight):
        return PartsMethod([quant_method_for(p, device) for p in w.parts], [p.shape[0] for p in w.parts])
    raise TypeError(f"no quantized method for {type(w).__name__}")


class SplitWeight:
    """A merged layer whose row blocks come in two formats (GGUF files that mix 4-bit q and k with a Q6_K / Q8_0 v,
    as llama.cpp's Q4_K_M does): each run of shards of one format stays in it, and the layer runs one matmul per
    run. Converting the 4-bit shards to int8 instead would be exact too, but would double their memory."""

    def __init__(self, parts: list) -> None:
        self.parts = parts

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.parts), self.parts[0].shape[1]


class PartsMethod:
    """y = [x W_1^T | x W_2^T | ...] + b for the parts of a SplitWeight, each with its own method."""

    def __init__(self, methods: list, rows: list[int]) -> None:
        self.methods, self.rows = methods, rows

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        outs, start = [], 0
        for method, n in zip(self.methods, self.rows):
            bias = None if layer.bias is None else layer.bias[start:start + n]
            outs.append(method.apply(_Bias(bias), x))
            start += n
        return torch.cat(outs, dim=-1)


class _Bias:  # what a method's apply() reads from its layer
    def __init__(self, bias) -> None:
        self.bias = bias


def merge_shards(shards: list):
    """One quantized matrix from the row blocks of a merged layer (q|k|v, gate|up), all of one type; GGUF 4-bit
    shards beside 5/6/8-bit ones (llama.cpp's mixed files) make a SplitWeight of one part per run of a type."""
    from turboinfer.layers.quantization.grouped_int8 import GroupedInt8Weight
    from turboinfer.layers.quantization.q4 import Q4Weight

    kinds = {type(w) for w in shards}
    if kinds == {Q4Weight, GroupedInt8Weight}:
        runs: list[list] = []
        for w in shards:
            if runs and type(runs[-1][0]) is type(w):
                runs[-1].append(w)
            else:
                runs.append([w])
        return SplitWeight([merge_shards(run) for run in runs])
    kind = type(shards[0])
    if any(type(w) is not kind for w in shards) or not hasattr(kind, "cat"):
        raise ValueError("all shards of a merged layer must share one quantization type")
    return kind.cat(shards)
