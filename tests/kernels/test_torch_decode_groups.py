"""The PyTorch decode attention's length groups: a batch whose padded K/V would exceed DECODE_GATHER_TOKENS rows
is computed a group of sequences at a time, longest first, with the same result as one padded gather."""

from __future__ import annotations

import pytest
import torch

from paged_inputs import TOL, PagedKV
from turboinfer.kernels.torch_ref import attention as ref


def _run(seq_lens, budget, monkeypatch, kv_dtype=None, window=None, dtype=torch.float32):
    monkeypatch.setattr(ref, "DECODE_GATHER_TOKENS", budget)
    kv = PagedKV(seq_lens, 2, 16, 4, dtype, kv_dtype, torch.device("cpu"))
    q = torch.randn(len(seq_lens), 8, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    lens = torch.tensor(seq_lens)
    args = (q, *kv.args(), kv.block_tables, lens, max(seq_lens), 0.25, window)
    out = ref.decode_attention(*args, **kv.scales())
    return out, ref.plan_decode(kv.block_tables, lens, max(seq_lens), 4, window)


@pytest.mark.parametrize("kv_dtype, window", [(None, None), (torch.int8, None), (None, 5)],
                         ids=["float", "int8-kv", "window"])
def test_groups_match_one_padded_gather(kv_dtype, window, monkeypatch):
    seq_lens = [3, 70, 1, 33, 70, 9, 128, 17]
    whole, plan = _run(seq_lens, 10**9, monkeypatch, kv_dtype, window)
    assert len(plan) == 1 and plan[0][0] is None
    grouped, plan = _run(seq_lens, 144, monkeypatch, kv_dtype, window)
    torch.testing.assert_close(grouped, whole, **TOL[torch.float32])
    rows = torch.cat([r for r, _, _ in plan])
    assert sorted(rows.tolist()) == list(range(len(seq_lens)))  # every sequence once
    lens = torch.tensor(seq_lens)
    for r, flat, mask in plan:
        gathered = flat.numel() * 4
        assert gathered == len(r) * mask.shape[-1]
        assert gathered <= 144 or len(r) == 1  # within the budget, or one sequence alone
        assert mask.shape[-1] == -(-int(lens[r].max()) // 4) * 4  # padded to the group's longest only
    assert [len(r) for r, _, _ in plan] == [1, 2, 4, 1]  # 128 | 70, 70 | 33, 17, 9, 3 | 1 (padded to blocks of 4)


def test_one_sequence_longer_than_the_budget_is_its_own_group(monkeypatch):
    seq_lens = [200, 5, 6]
    whole, _ = _run(seq_lens, 10**9, monkeypatch, dtype=torch.bfloat16)
    grouped, plan = _run(seq_lens, 16, monkeypatch, dtype=torch.bfloat16)
    assert [r.tolist() for r, _, _ in plan] == [[0], [2, 1]]
    torch.testing.assert_close(grouped, whole, **TOL[torch.bfloat16])
