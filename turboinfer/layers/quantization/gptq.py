"""int4 by GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323).

Round-to-nearest treats every weight alone. GPTQ quantizes one input column at a time and pushes each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error
||X W^T - X Q^T||^2, i.e. H = 2 X^T X over calibration inputs X. With the Cholesky factor of H^-1 the update is
one row of that factor per column; updates are applied lazily, inside blocks of 128 columns first and to the rest
of the matrix once per block. Columns go in act order (decreasing diag(H)) with static groups: each group's
asymmetric [min, max] grid is fixed up front from the original weights, so groups stay contiguous and the result
is an ordinary Q4Weight that the int4 kernels run unchanged.

The model is quantized layer by layer on the built-in calibration text (49 passages, ~15,000 tokens, one
prefill each), as in the paper: a decoder layer's inputs come from the already quantized layers before it, and inside a
layer each Linear (q|k|v, o, gate|up, down) sees the outputs of the ones quantized before it.

With --awq as well (quantize_awq_gptq), each Linear first gets AWQ's activation-aware input scales, searched on
the inputs it sees at that point, and GPTQ then rounds the scaled weights, as llm-compressor's AWQ-then-GPTQ
recipes do."""

from __future__ import annotations

import logging
from dataclasses import replace

import torch
from torch import nn

from turboinfer.layers.quantization.awq import (InputStats, calibration_caches, prefill_batch, search_scale,
                                                spread_rows)
from turboinfer.layers.quantization.q4 import Q4Weight, q4_grid

logger = logging.getLogger("turboinfer")

BLOCK_SIZE = 128  # columns whose updates are applied lazily together (the paper's B)
PERC_DAMP = 0.01  # dampening added to H's diagonal, as a fraction of its mean (the paper's)
CHANNEL_DAMP = 0.1  # dampening added to each diagonal entry, as a fraction of itself (see quantize_gptq)
AWQ_SAMPLE_ROWS = 512  # input rows kept (spread over the segments) for AWQ's scale search under --awq --gptq
REFIT_ROUNDS = 2  # GPTQ passes re-run on the least-squares grid of the previous one (see quantize_gptq)
REFIT_CHUNK_BYTES = 1 << 28  # working memory of the least-squares fit, per block of rows


def quantize_gptq(w: torch.Tensor, hessian: torch.Tensor, group_size: int, block_size: int = BLOCK_SIZE,
                  perc_damp: float = PERC_DAMP, channel_damp: float = CHANNEL_DAMP,
                  act_order: bool = True, refit_rounds: int = REFIT_ROUNDS) -> Q4Weight:
    """w: [N, K] dense; hessian: [K, K] = 2 X^T X / num_tokens of the layer's inputs X [num_tokens, K].

    GPTQ picks codes on a grid it never revisits. With refit_rounds, each group's scale and zero are then
    re-solved by least squares for the chosen codes against the layer's output error (refit_grid: exact, so the
    error on the calibration inputs can only fall), and GPTQ runs again on that grid, then the grid is re-solved
    again, refit_rounds times, keeping the result with the lowest error. On SmolLM2-135M (AWQ's scales first) the
    KL divergence from float over benchmarks/data/lighthouses.txt fell from 0.061 to 0.052 at group 64 and from
    0.071 to 0.061 at group 128 (GPTQ alone: 0.071 to 0.055, 0.082 to 0.058); in a separate trial one fit
    without the further passes reached 0.057 at group 64, against 0.055 with them.

    act_order (the reference code's desc_act with static_groups): columns are quantized in order of decreasing
    diag(H), the inputs with the most energy first, while they still have the most columns left to absorb their
    error; every group's grid is fixed up front from the original weights, so groups stay contiguous in storage.
    Without it, columns go left to right and a group's grid is set from the error-corrected weights when its
    first column is reached. On SmolLM2-135M at group 64 (AWQ's scales first, 36 passages of calibration) act
    order cut the KL divergence from float from 0.071 to 0.062 on benchmarks/data/lighthouses.txt and from 0.097
    to 0.086 on 12 held-out passages of prose; GPTQ alone went from 0.111 to 0.073.

    Dampening: the paper's perc_damp * mean(diag H) on the diagonal keeps H invertible, and channel_damp * diag H
    on top shrinks H toward its diagonal, where GPTQ is plain round-to-nearest. Calibrated on ~350 tokens (fewer
    than most layers' input width, so H was rank-deficient) an undamped GPTQ cut the calibration output error 3x
    while raising it on held-out text above round-to-nearest's; about 0.1 of 0, 0.03, 0.05, 0.1, 0.25, 0.4 and 1.5
    did best on held-out text then. On ~7,200 tokens SmolLM2-135M at group 64 still did best near 0.1 (KL from
    float over benchmarks/data/lighthouses.txt: 0.153 undamped, 0.117 at 0.03, 0.111 at 0.1; left to right).
    """
    kw = dict(block_size=block_size, perc_damp=perc_damp, channel_damp=channel_damp, act_order=act_order)
    qw = _gptq_pass(w, hessian, group_size, **kw)
    if not refit_rounds:
        return qw
    best = refit_grid(w, qw, hessian)
    best_err = output_error(w, best, hessian)
    for _ in range(refit_rounds):
        cand = refit_grid(w, _gptq_pass(w, hessian, group_size, grid=(best.scale, best.zero), **kw), hessian)
        err = output_error(w, cand, hessian)
        if err >= best_err:
            break
        best, best_err = cand, err
    return best


def _gptq_pass(w: torch.Tensor, hessian: torch.Tensor, group_size: int, block_size: int, perc_damp: float,
               channel_damp: float, act_order: bool, grid: tuple[torch.Tensor, torch.Tensor] | None = None) -> Q4Weight:
    """One GPTQ pass. grid: every group's (scale, zero) [N, K // group_size], fixed up front (static groups, in
    either column order); None: from the weights (act order: the original ones; left to right: the
    error-corrected ones when a group's first column is reached)."""
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"in_features {k} is not a multiple of the group size {group_size}")
    block_size = max(block_size, group_size) // group_size * group_size  # a group never straddles two blocks
    w = w.float().clone()
    h = hessian.double().clone()
    dead = h.diagonal() == 0  # an input channel that is always zero: its weights do not matter
    h[dead, dead] = 1
    w[:, dead] = 0
    static = act_order or grid is not None
    if grid is not None:
        scale, zero = grid[0].float().clone(), grid[1].float().clone()
    elif act_order:
        scale, zero = q4_grid(w.view(n, k // group_size, group_size))
    else:  # filled group by group as the columns are reached
        scale = torch.empty(n, k // group_size, device=w.device)
        zero = torch.empty_like(scale)
    if act_order:
        perm = torch.argsort(h.diagonal(), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
        group_of = (perm // group_size).tolist()  # the group of the i-th column quantized
    else:
        group_of = [c // group_size for c in range(k)]
    h.diagonal().mul_(1 + channel_damp).add_(perc_damp * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row i holds the error-feedback weights of column i onto columns > i.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    q = torch.empty(n, k, dtype=torch.uint8, device=w.device)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        w1, hb = w[:, b0:b1], h_inv[b0:b1, b0:b1]  # w1 is a view: updates land in w
        err = torch.empty_like(w1)  # [N, b1 - b0] scaled errors, fed to the columns after the block
        for i in range(b1 - b0):
            if static:
                g = group_of[b0 + i]
                s, z = scale[:, g], zero[:, g]
            elif i % group_size == 0:
                g = (b0 + i) // group_size
                scale[:, g], zero[:, g] = q4_grid(w1[:, i:i + group_size])
                s, z = scale[:, g], zero[:, g]
            col = w1[:, i]
            codes = ((col - z) / s).round_().clamp_(0, 15)
            q[:, b0 + i] = codes.to(torch.uint8)
            e = (col - (codes * s + z)) / hb[i, i]
            w1[:, i + 1:].addr_(e, hb[i, i + 1:], alpha=-1)
            err[:, i] = e
        w[:, b1:].addmm_(err, h_inv[b0:b1, b1:], alpha=-1)
    if act_order:
        q[:, perm] = q.clone()  # back to the weights' own column order
    return Q4Weight(q, scale, zero, group_size)


def output_error(w: torch.Tensor, qw: Q4Weight, hessian: torch.Tensor) -> float:
    """tr((W - Q) H (W - Q)^T): the layer's summed squared output error on the calibration inputs (H as above)."""
    d = w.double() - qw.dequantize().double()
    return (d @ hessian.double() * d).sum().item()


def refit_grid(w: torch.Tensor, qw: Q4Weight, hessian: torch.Tensor) -> Q4Weight:
    """The same codes with every group's scale and zero re-solved to minimise output_error: for each row r,
    w_hat = sum over groups g of (scale[r, g] q_g + zero[r, g] 1_g) is linear in the row's 2G unknowns, so they
    solve one symmetric 2G x 2G system. A vanishing ridge (1e-9 of the mean diagonal) toward the current grid
    keeps a group whose inputs are all zero where it was; a non-positive solved scale keeps its old pair."""
    n, k = w.shape
    gs = qw.group_size
    ng = k // gs
    hb = hessian.double().view(ng, gs, ng, gs)
    hsum = hb.sum(3)  # [G, gs, G]: H summed over the columns of each group
    m_zz = hsum.sum(1)  # [G, G]
    step = max(1, REFIT_CHUNK_BYTES // (8 * k * ng))
    scale, zero = qw.scale.clone(), qw.zero.clone()
    for r0 in range(0, n, step):
        r1 = min(n, r0 + step)
        q = qw.q[r0:r1].double().view(r1 - r0, ng, gs)
        t = torch.einsum("rbj,aibj->raib", q, hb)  # [R, G, gs, G]: (H q_r) per group pair
        m_ss = torch.einsum("rai,raib->rab", q, t)
        m_sz = torch.einsum("rai,aib->rab", q, hsum)
        hw = (w[r0:r1].double() @ hessian.double()).view(r1 - r0, ng, gs)
        m = torch.cat([torch.cat([m_ss, m_sz], 2), torch.cat([m_sz.transpose(1, 2), m_zz.expand_as(m_ss)], 2)], 1)
        b = torch.cat([(q * hw).sum(-1), hw.sum(-1)], 1)
        old = torch.cat([scale[r0:r1], zero[r0:r1]], 1).double()
        ridge = 1e-9 * m.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).clamp_min(1e-30)
        m = m + torch.diag_embed(ridge.expand(-1, 2 * ng))
        theta = torch.linalg.solve(m, (b + ridge * old)[..., None])[..., 0]
        s, z = theta[:, :ng].float(), theta[:, ng:].float()
        ok = s > 0
        scale[r0:r1] = torch.where(ok, s, scale[r0:r1])
        zero[r0:r1] = torch.where(ok, z, zero[r0:r1])
    return replace(qw, scale=scale, zero=zero)


class HessianRecorder:
    """Forward hooks summing X^T X at the input of each given Linear, and the order the Linears ran in. With
    sample_rows, each pass also keeps that many evenly spaced input rows and the sum of |x| per channel, for
    AWQ's scale search (InputStats)."""

    def __init__(self, linears: dict[str, nn.Module], sample_rows: int = 0) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.abs_sums: dict[str, torch.Tensor] = {}
        self.samples: dict[str, list[torch.Tensor]] = {}
        self.order: list[str] = []
        self.sample_rows = sample_rows
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in linears.items()]

    def _hook(self, name: str):
        def record(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [num_tokens, K]
            if name not in self.sums:
                self.order.append(name)
                self.sums[name] = torch.zeros(x.shape[1], x.shape[1], device=x.device)
                self.counts[name] = 0
                self.abs_sums[name] = torch.zeros(x.shape[1], device=x.device)
                self.samples[name] = []
            self.sums[name].addmm_(x.t(), x)
            self.counts[name] += x.shape[0]
            if self.sample_rows:
                self.abs_sums[name] += x.abs().sum(0)
                self.samples[name].append(spread_rows(x, self.sample_rows))
        return record

    def hessian(self, name: str) -> torch.Tensor:
        return self.sums[name] * (2 / self.counts[name])

    def input_stats(self, name: str) -> InputStats:
        return InputStats(self.abs_sums[name] / self.counts[name], torch.cat(self.samples[name]))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def quantize_awq_gptq(w: torch.Tensor, hessian: torch.Tensor, stats: InputStats, group_size: int) -> Q4Weight:
    """AWQ's per-channel scales s (searched as for --awq), then GPTQ's rounding of W diag(s) against the inputs
    the layer then sees, X diag(1/s): their Hessian is diag(1/s) H diag(1/s)."""
    s = search_scale(w, stats, group_size)
    inv = 1.0 / s
    return replace(quantize_gptq(w.float() * s, hessian * inv[:, None] * inv[None, :], group_size), input_scale=inv)


class _Stop(Exception):
    pass


def _first_layer_args(model: nn.Module, token_ids: list[int], positions: torch.Tensor, meta) -> tuple:
    """Run the model up to its first decoder layer and return that layer's positional arguments."""
    captured = []

    def grab(module, args):
        captured.append(args)
        raise _Stop

    handle = model.model.layers[0].register_forward_pre_hook(grab)
    try:
        model(torch.tensor(token_ids, device=positions.device), positions, meta)
    except _Stop:
        pass
    finally:
        handle.remove()
    return captured[0]


def quantize_model_gptq(model: nn.Module, segments: list[list[int]], group_size: int, device: torch.device,
                        awq: bool = False) -> dict[str, Q4Weight]:
    """Quantize every eligible Linear of `model` in place with GPTQ (after AWQ's scales when `awq`) over one
    prefill of each token-id segment; returns the quantized weights by module name, like
    transform.quantize_model. The segments are prefilled one at a time, all through one decoder layer before the
    next, so only their hidden states (segments x tokens x hidden) are held between layers."""
    from turboinfer.layers.quantization import quant_method_for
    from turboinfer.layers.quantization.transform import layer_group_size, quantizable_linears

    eligible = dict(quantizable_linears(model))
    sample_rows = -(-AWQ_SAMPLE_ROWS // len(segments)) if awq else 0
    out: dict[str, Q4Weight] = {}
    with calibration_caches(model, max(map(len, segments))), torch.no_grad():
        batches = [prefill_batch(model, len(ids)) for ids in segments]
        states = [_first_layer_args(model, ids, *batch) for ids, batch in zip(segments, batches)]
        for idx, layer in enumerate(model.model.layers):
            prefix = f"model.layers.{idx}."
            pending = {name: m for name, m in eligible.items() if name.startswith(prefix)}
            while pending:
                # One pass records every pending Linear's input, but only the first to run saw nothing but
                # quantized layers upstream; quantize it and go again.
                recorder = HessianRecorder(pending, sample_rows)
                try:
                    for args in states:
                        layer(*args)
                finally:
                    recorder.remove()
                name = recorder.order[0]
                linear = pending.pop(name)
                g = layer_group_size(linear.in_features, group_size)
                if g is None:
                    logger.warning("%s: in_features %d has no int4 group size dividing it; left unquantized", name,
                                   linear.in_features)
                    continue
                w, h = linear.weight.data, recorder.hessian(name)
                qw = quantize_awq_gptq(w, h, recorder.input_stats(name), g) if awq else quantize_gptq(w, h, g)
                linear.quant_method = quant_method_for(qw, device)
                linear.weight = nn.Parameter(torch.empty(0, device=device), requires_grad=False)
                out[name] = qw
            # decoder layers map (positions, hidden, residual, meta) -> (hidden, residual) (models/llama.py)
            for i, args in enumerate(states):
                hidden, residual = layer(*args)
                states[i] = (args[0], hidden, residual, *args[3:])
    return out
