"""Logits -> next tokens, one row per sequence, each row with its own parameters.

Order: penalties, min_tokens masking, then greedy rows take the argmax; the others are divided by their
temperature, filtered by min_p, top_k and top_p, and sampled by the exponential race (argmax of p / E with
E ~ Exp(1), equivalent to drawing from p). A row whose request has a seed draws E from its own generator,
so its tokens do not depend on what else is in the batch. Logprobs are those of the raw model
distribution (before penalties and temperature), as vLLM and OpenAI report them.

Which rows need which step is decided on the host from the requests' parameters, never by reading a device
tensor back, and per-row values reach the device by asynchronous copies (runner/staging.py), so on a GPU the only
synchronisation is the final copy of the sampled ids.
"""

from __future__ import annotations

import torch

from turboinfer.runner.request_state import RequestState
from turboinfer.runner.staging import to_device


def _penalize(logits: torch.Tensor, rows: list[int], reqs: list[RequestState]) -> None:
    vocab = logits.shape[-1]
    for i in rows:
        req, p = reqs[i], reqs[i].params
        row = logits[i]
        if p.repetition_penalty != 1.0:
            seen = to_device(req.token_ids, torch.int64, logits.device).clamp_(0, vocab - 1)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and req.output_token_ids:
            out = to_device(req.output_token_ids, torch.int64, logits.device)
            counts = torch.bincount(out, minlength=vocab)[:vocab].to(row.dtype)
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filter(logits: torch.Tensor, params: list, device: torch.device) -> torch.Tensor:
    # logits: [rows, vocab] already divided by temperature; returns them with excluded tokens at -inf
    if any(p.min_p > 0 for p in params):
        min_p = to_device([p.min_p for p in params], torch.float32, device)
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < min_p[:, None] * probs.max(-1, keepdim=True).values, float("-inf"))
    if any(p.top_k > 0 or p.top_p < 1 for p in params):
        top_k = to_device([p.top_k for p in params], torch.int64, device)
        top_p = to_device([p.top_p for p in params], torch.float32, device)
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
        drop = (top_k[:, None] > 0) & (ranks >= top_k[:, None])
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p; the first is always kept
        drop = (probs.cumsum(-1) - probs) >= top_p[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return logits


def top_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[dict[int, tuple[float, int]]]:
    """Per row: {token: (logprob, rank)} for the given token plus the k most likely ones."""
    chosen = logprobs.gather(-1, token_ids[:, None])  # [rows, 1]
    ranks = (logprobs > chosen).sum(-1) + 1
    top_vals, top_ids = logprobs.topk(k, dim=-1) if k else (None, None)
    out = []
    chosen_l, ranks_l, ids_l = chosen[:, 0].tolist(), ranks.tolist(), token_ids.tolist()
    for r in range(logprobs.shape[0]):
        d = {}
        if k:
            for j, (t, v) in enumerate(zip(top_ids[r].tolist(), top_vals[r].tolist())):
                d[t] = (v, j + 1)
        d[ids_l[r]] = (chosen_l[r], ranks_l[r])
        out.append(d)
    return out


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, logits: torch.Tensor, reqs: list[RequestState]):
        """logits: [num_seqs, vocab] float32. Returns (token ids, per-row logprob dicts or None)."""
        n = logits.shape[0]
        want_lp = [r.params.logprobs is not None for r in reqs]
        raw_logprobs = logits.log_softmax(-1) if any(want_lp) else None
        logits = logits.clone()
        penalized = [i for i, r in enumerate(reqs) if r.params.has_penalties]
        if penalized:
            _penalize(logits, penalized, reqs)
        for i, r in enumerate(reqs):
            if r.num_output_tokens < r.params.min_tokens:
                banned = list(r.params.stop_token_ids) + ([] if r.params.ignore_eos else list(r.eos_token_ids))
                if banned:
                    logits[i, banned] = float("-inf")

        tokens = logits.argmax(-1)
        random_rows = [i for i, r in enumerate(reqs) if not r.params.greedy]
        if random_rows:
            idx = to_device(random_rows, torch.int64, logits.device)
            sub = logits[idx]
            ps = [reqs[i].params for i in random_rows]
            temp = to_device([p.temperature for p in ps], torch.float32, logits.device)
            sub = _filter(sub / temp[:, None], ps, logits.device)
            probs = sub.softmax(-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(random_rows):
                req = reqs[i]
                if req.params.seed is not None and req.generator is None:
                    req.generator = torch.Generator(device=logits.device).manual_seed(req.params.seed)
                noise[j].exponential_(generator=req.generator or self.generator)
            tokens[idx] = (probs / noise).argmax(-1)

        logprobs = [None] * n
        token_ids = tokens.tolist()
        if raw_logprobs is not None:
            rows = [i for i in range(n) if want_lp[i]]
            k = max(reqs[i].params.logprobs for i in rows)
            idx = to_device(rows, torch.int64, logits.device)
            dicts = top_logprobs(raw_logprobs[idx], tokens[idx], k)
            for i, d in zip(rows, dicts):
                want = reqs[i].params.logprobs
                logprobs[i] = {t: v for t, v in d.items() if t == token_ids[i] or v[1] <= want}
        return token_ids, logprobs
