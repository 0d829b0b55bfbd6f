"""decode_attention: the split-KV kernel and its reduce against the twin; the split heuristic."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_inputs import TOL, PagedKV  # noqa: E402

from turboinfer.kernels.torch_ref import attention as ref  # noqa: E402
from turboinfer.kernels.triton import decode as tri  # noqa: E402

HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1), "mqa80": (80, 1)}  # 80: a group wider than one tile


def _check(device, seq_lens, heads=(8, 2), head_dim=16, block_size=4, dtype=torch.float32, kv_dtype=None,
           window=None, seq_lens_dtype=torch.int64):
    num_heads, num_kv_heads = heads
    kv = PagedKV(seq_lens, num_kv_heads, head_dim, block_size, dtype, kv_dtype, device)
    torch.manual_seed(1)
    q = torch.randn(len(seq_lens), num_heads, head_dim, device=device).to(dtype)
    lens = torch.tensor(seq_lens, dtype=seq_lens_dtype, device=device)
    args = (q, *kv.args(), kv.block_tables, lens, max(seq_lens, default=0), head_dim ** -0.5, window)
    want = ref.decode_attention(*args, **kv.scales())
    got = tri.decode_attention(*args, **kv.scales())
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_ragged_batch(heads, device):
    _check(device, [1, 2, 17, 70], heads=heads)


def test_bfloat16_int32_lengths(device):
    _check(device, [5, 33], dtype=torch.bfloat16, seq_lens_dtype=torch.int32)


@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_splits(num_splits, monkeypatch, device):
    # more splits than short sequences have tokens: their trailing splits are empty and must weigh nothing
    monkeypatch.setattr(tri, "num_kv_splits", lambda *a: num_splits)
    _check(device, [1, 9, 300], heads=(4, 2))


@pytest.mark.parametrize("window", [1, 5, 64])
def test_sliding_window(window, monkeypatch, device):
    monkeypatch.setattr(tri, "num_kv_splits", lambda *a: 3)
    _check(device, [1, 6, 90], window=window)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim, device):
    _check(device, [3, 40], heads=(4, 1), head_dim=head_dim, block_size=16)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_cache(kv_dtype, device):
    _check(device, [1, 23, 64], kv_dtype=kv_dtype)


def test_empty_batch(device):
    kv = PagedKV([], 2, 16, 4, torch.float32, None, device)
    q = torch.randn(0, 8, 16, device=device)
    lens = torch.zeros(0, dtype=torch.int64, device=device)
    assert tri.decode_attention(q, *kv.args(), kv.block_tables, lens, 0, 0.25).shape == (0, 8, 16)


def test_num_kv_splits():
    # the docstring's examples: 132 SMs, 8 KV heads
    assert tri.num_kv_splits(1, 8, 65536, 132) == 64
    assert tri.num_kv_splits(1, 8, 1024, 132) == 4
    assert tri.num_kv_splits(32, 8, 32768, 132) == 3
    assert tri.num_kv_splits(64, 8, 32768, 132) == 2
    assert tri.num_kv_splits(66, 8, 32768, 132) == 1
    assert tri.num_kv_splits(1, 8, 100, 132) == 1  # too short to be worth splitting
    assert tri.num_kv_splits(1, 1, 10**6, 132) == tri.MAX_SPLITS


def test_rejects_bad_inputs(device):
    kv = PagedKV([5, 3], 2, 16, 4, torch.float32, None, device)
    q = torch.randn(2, 4, 16, device=device)
    lens = torch.tensor([5, 3], device=device)
    with pytest.raises(ValueError, match="seq_lens must be"):
        tri.decode_attention(q, *kv.args(), kv.block_tables, lens.float(), 5, 0.25)
    with pytest.raises(ValueError, match="seq_lens must be"):
        tri.decode_attention(q, *kv.args(), kv.block_tables, lens[:1], 5, 0.25)
    with pytest.raises(ValueError, match="needs more than"):
        tri.decode_attention(q, *kv.args(), kv.block_tables, lens, 50, 0.25)
    with pytest.raises(ValueError, match="must be float16/bfloat16/float32"):
        tri.decode_attention(q.double(), *kv.args(), kv.block_tables, lens, 5, 0.25)
    with pytest.raises(ValueError, match="sliding_window"):
        tri.decode_attention(q, *kv.args(), kv.block_tables, lens, 5, 0.25, 0)
