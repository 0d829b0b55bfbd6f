"""Rotary position embeddings (RoFormer, arXiv:2104.09864) in the rotate-half layout of HF checkpoints,
with the context-extension schemes Llama-family checkpoints ship: linear position interpolation
(arXiv:2306.15595), Llama-3.1's frequency-band rescaling, and YaRN (arXiv:2309.00071)."""

from __future__ import annotations

import math

import torch
from torch import nn

from turboinfer.errors import UnsupportedModelError


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated smoothly.
    factor = s["factor"]
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn(inv_freq: torch.Tensor, dim: int, base: float, s: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    factor = s["factor"]
    orig = s.get("original_max_position_embeddings") or max_pos
    beta_fast, beta_slow = s.get("beta_fast", 32.0), s.get("beta_slow", 1.0)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attn_factor = s.get("attention_factor")
    if attn_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attn_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attn_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 where frequencies are high enough to keep as they are
    return inv_freq / factor * (1 - extrapolate) + inv_freq * extrapolate, attn_factor


def rope_inv_freq(head_dim: int, base: float, scaling: dict | None, max_pos: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] and the factor cos/sin are multiplied by (YaRN's mscale)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "default":
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / scaling["factor"], 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn(inv_freq, head_dim, base, scaling, max_pos)
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3, yarn)")


class RotaryEmbedding(nn.Module):
    """cos/sin tables of one RoPE variant, shared by every layer that uses it. The runner gathers each table's rows
    for a step's positions once (`rope_for_step`) and passes them in the attention metadata, so the layers only
    rotate; `table_id` is this table's index there (set by `index_rotaries`)."""

    table_id = 0

    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None) -> None:
        super().__init__()
        self.inv_freq, self.attn_factor = rope_inv_freq(head_dim, base, scaling, max_position)
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.resize(max_position)

    def resize(self, num_positions: int) -> None:
        """Tables for positions 0 .. num_positions - 1: the engine sizes them to the context it serves, which with RoPE
        scaling can pass max_position_embeddings and otherwise is often far below it (2 MiB for SmolLM2's 8192).
        Row p does not depend on the size (the same float32 products), so resizing changes no value."""
        device = self.cos.device
        t = torch.arange(num_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))  # [num_positions, head_dim // 2]
        self.cos = freqs.cos() * self.attn_factor
        self.sin = freqs.sin() * self.attn_factor

    def gather(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (cos, sin), each [num_tokens, 1, head_dim // 2] in dtype, for these positions."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    def forward(self, x: torch.Tensor, rope: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        # x: [num_tokens, num_heads, head_dim]; q and k heads can go through together in one call.
        # rope: the step's gathered tables (AttentionMetadata.rope), indexed by table_id.
        cos, sin = rope[self.table_id]
        return _rotate(x, cos, sin)


def index_rotaries(model: nn.Module) -> list[RotaryEmbedding]:
    """The model's distinct rotary tables, in module order, each told its index into AttentionMetadata.rope."""
    tables = [m for m in model.modules() if isinstance(m, RotaryEmbedding)]
    for i, t in enumerate(tables):
        t.table_id = i
    return tables


def rope_for_step(tables: list[RotaryEmbedding], positions: torch.Tensor,
                  dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every table's rows for one step's positions (AttentionMetadata.rope); tables from index_rotaries."""
    return [t.gather(positions, dtype) for t in tables]


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
