"""Activation-aware int4 scaling, after AWQ (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", arXiv:2306.00978).

A few input channels carry much larger activations than the rest, and the rounding error of their weights is
multiplied by those activations. Scaling weight column j up by s_j before rounding (and the input down by s_j
at run time) gives those columns a finer effective grid. Per layer, s = mean|x|^alpha with alpha picked from a
grid to minimise || X W^T - X (Q(W diag(s)) diag(1/s))^T || on inputs recorded while the float model reads a
short calibration text. alpha = 0 is plain round-to-nearest, so on those inputs the search never does worse.
Unlike the paper, 1/s is not folded into the preceding norm: the layer multiplies it into x (one elementwise
op), which works for every layer, o_proj and down_proj included.

Then, as the paper's implementation does, each group's range is clipped: for every output row and group the
weights are clamped to [-r, r] x max|w| for r in CLIP_GRID before rounding, and the r with the smallest output
error of that group on the same inputs is kept (r = 1 is no clipping, so again never worse on those inputs). A
narrower range gives the bulk of the weights a finer grid at the cost of a few outliers."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources

import torch
from torch import nn

from turboinfer.layers.quantization.q4 import Q4Weight, quantize_q4

MAX_CALIBRATION_TOKENS = 512
ALPHA_GRID = [i / 20 for i in range(21)]  # 0, 0.05, ..., 1
CLIP_GRID = [1 - i / 20 for i in range(11)]  # 1, 0.95, ..., 0.5
CLIP_ROWS = 1024  # output rows searched at a time (bounds the [sample, rows, groups] error tensor)


@dataclass
class InputStats:
    """What the calibration pass records at one linear layer's input."""

    mean_abs: torch.Tensor  # [K] float32: mean |x| per input channel over every calibration token
    sample: torch.Tensor  # [m, K] float32: evenly spaced input rows, the X of the error being minimised


def calibration_text() -> str:
    """The built-in calibration text: 49 passages of English prose (encyclopedic, instructions, letters, reviews,
    stories with dialogue; about 15,000 tokens), separated by blank lines."""
    return resources.files("turboinfer.layers.quantization").joinpath("calibration.txt").read_text()


def calibration_segments(tokenizer, max_len: int = MAX_CALIBRATION_TOKENS) -> list[list[int]]:
    """The calibration text as token-id segments of at most max_len tokens: whole passages packed in order, each
    segment encoded as one text ending in a newline (a passage longer than max_len is cut). The first segment is
    the first passage, about 350 tokens, which AWQ calibrates on; GPTQ reads them all."""
    segments: list[list[int]] = []
    text = ""
    for passage in (p.strip() for p in calibration_text().split("\n\n")):
        if not passage:
            continue
        joined = f"{text}\n\n{passage}" if text else passage
        if text and len(tokenizer.encode(joined + "\n")) > max_len:
            segments.append(tokenizer.encode(text + "\n")[:max_len])
            joined = passage
        text = joined
    segments.append(tokenizer.encode(text + "\n")[:max_len])
    return segments


def collect_input_stats(model: nn.Module, token_ids: list[int], skip: tuple[str, ...] = ("lm_head",),
                        max_sample_rows: int = 128) -> dict[str, InputStats]:
    """Run one prefill of `token_ids` through the (float) model and record every Linear's inputs, by module
    name. The KV cache the attention layers need is a temporary one block long; any cache the layers already
    hold is put back afterwards."""
    from turboinfer.layers.linear import Linear

    stats: dict[str, InputStats] = {}

    def hook(name):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [num_tokens, K]
            stats[name] = InputStats(x.abs().mean(0), spread_rows(x, max_sample_rows))
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, Linear) and name.rsplit(".", 1)[-1] not in skip]
    try:
        _prefill(model, token_ids)
    finally:
        for h in handles:
            h.remove()
    return stats


def spread_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """A copy of at most n evenly spaced rows of x [rows, K], first and last included."""
    rows = torch.linspace(0, x.shape[0] - 1, min(n, x.shape[0])).round().long()
    return x[rows.to(x.device)]


def _prefill(model: nn.Module, token_ids: list[int]) -> None:
    n = len(token_ids)
    with calibration_batch(model, n) as (positions, meta), torch.inference_mode():
        model(torch.tensor(token_ids, device=positions.device), positions, meta)


@contextmanager
def calibration_batch(model: nn.Module, num_tokens: int):
    """-> (positions [num_tokens], attention metadata) for one prefill of num_tokens tokens, with a temporary KV
    cache one block long in every attention layer; the caches the layers held are put back on exit."""
    with calibration_caches(model, num_tokens):
        yield prefill_batch(model, num_tokens)


@contextmanager
def calibration_caches(model: nn.Module, max_tokens: int):
    """Give every attention layer a temporary KV cache of two blocks of max_tokens tokens (block 0 is the null
    block; a prefill of up to max_tokens tokens fills block 1); the caches the layers held are put back on exit."""
    param = next(p for p in model.parameters() if p.is_floating_point() and p.numel())
    layers = model.attention_layers()
    saved = [(a.k_cache, a.v_cache, a.k_scale, a.v_scale) for a in layers]
    try:
        for a in layers:
            a.k_cache = torch.zeros(2, max_tokens, a.num_kv_heads, a.head_dim, dtype=param.dtype,
                                    device=param.device)
            a.v_cache = torch.zeros_like(a.k_cache)
            a.k_scale = a.v_scale = None
        yield
    finally:
        for a, (k, v, ks, vs) in zip(layers, saved):
            a.k_cache, a.v_cache, a.k_scale, a.v_scale = k, v, ks, vs


def prefill_batch(model: nn.Module, num_tokens: int) -> tuple:
    """-> (positions [num_tokens], attention metadata) for one prefill of num_tokens tokens into block 1 of the
    caches calibration_caches installed (num_tokens at most their block size)."""
    from turboinfer.kernels import get_ops
    from turboinfer.kernels.metadata import AttentionMetadata, KVGroupMetadata
    from turboinfer.layers.rotary import index_rotaries, rope_for_step

    n = num_tokens
    layers = model.attention_layers()
    cache = layers[0].k_cache
    block, device = cache.shape[1], cache.device
    if n > block:
        raise ValueError(f"{n} calibration tokens do not fit a temporary cache block of {block}")
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    group = KVGroupMetadata(slot_mapping=torch.arange(block, block + n, device=device),
                            decode_block_tables=empty.view(0, 1),
                            prefill_block_tables=torch.ones(1, 1, dtype=torch.int64, device=device))
    positions = torch.arange(n, device=device)
    meta = AttentionMetadata(ops=get_ops("torch"), num_decode_tokens=0, decode_seq_lens=empty, decode_max_seq_len=0,
                             prefill_query_lens=[n], prefill_seq_lens=[n],
                             groups=[group] * (1 + max(a.kv_group for a in layers)),  # one temporary cache each
                             rope=rope_for_step(index_rotaries(model), positions, model.model.norm.weight.dtype))
    return positions, meta


def search_scale(w: torch.Tensor, stats: InputStats, group_size: int) -> torch.Tensor:
    """-> s [K] float32 minimising the output error of int4 round-to-nearest on stats.sample. w: [N, K]."""
    w = w.float()
    x = stats.sample.to(w.device)
    ref = x @ w.t()
    mean_abs = stats.mean_abs.to(w.device).clamp(min=1e-4)
    best_err, best_s = float("inf"), torch.ones_like(mean_abs)
    for alpha in ALPHA_GRID:
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centre the scales so neither end drifts far from 1
        approx = x @ (quantize_q4(w * s, group_size).dequantize() / s).t()
        err = (approx - ref).pow(2).mean().item()
        if err < best_err:
            best_err, best_s = err, s
    return best_s


def search_clip(w: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """-> w clamped per (row, group) to the range in CLIP_GRID x max|w| that minimises that group's output error
    ||x_g (Q(w_g) - w_g)^T||^2 over the rows of x. w: [N, K], x: [S, K] (the inputs w sees)."""
    n, k = w.shape
    xg = x.view(x.shape[0], k // group_size, group_size)
    out = torch.empty_like(w)
    for r0 in range(0, n, CLIP_ROWS):
        wr = w[r0:r0 + CLIP_ROWS]
        wg = wr.view(wr.shape[0], k // group_size, group_size)
        amax = wg.abs().amax(-1, keepdim=True)
        best_err = best = None
        for ratio in CLIP_GRID:
            bound = amax * ratio
            clipped = torch.maximum(torch.minimum(wg, bound), -bound)
            dq = quantize_q4(clipped.reshape(wr.shape), group_size).dequantize().view_as(wg)
            err = torch.einsum("ngk,sgk->sng", dq - wg, xg).pow(2).mean(0)  # [rows, groups]
            if best is None:
                best_err, best = err, clipped
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best = torch.where(better[..., None], clipped, best)
        out[r0:r0 + CLIP_ROWS] = best.reshape(wr.shape)
    return out


def quantize_awq(w: torch.Tensor, stats: InputStats, group_size: int) -> Q4Weight:
    s = search_scale(w, stats, group_size)
    scaled = search_clip(w.float() * s, stats.sample.to(w.device).float() / s, group_size)
    return replace(quantize_q4(scaled, group_size), input_scale=1.0 / s)
