"""prefill_attention: the FlashAttention kernel against the twin over the same paged cache."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_inputs import TOL, PagedKV  # noqa: E402

from turboinfer.kernels.torch_ref import attention as ref  # noqa: E402
from turboinfer.kernels.triton import prefill as tri  # noqa: E402

HEADS = {"mha": (4, 4), "gqa4": (8, 2), "mqa": (4, 1)}  # (query heads, KV heads)


def _check(device, query_lens, seq_lens, heads=(4, 2), head_dim=16, block_size=4, dtype=torch.float32,
           kv_dtype=None, window=None):
    num_heads, num_kv_heads = heads
    kv = PagedKV(seq_lens, num_kv_heads, head_dim, block_size, dtype, kv_dtype, device)
    torch.manual_seed(1)
    # q as the model hands it over: a strided view of a wider projection output
    q = torch.randn(sum(query_lens), num_heads + 2, head_dim, device=device).to(dtype)[:, 1:num_heads + 1]
    scale = head_dim ** -0.5
    args = (q, *kv.args(), kv.block_tables, query_lens, seq_lens, scale, window)
    want = ref.prefill_attention(*args, **kv.scales())
    got = tri.prefill_attention(*args, **kv.scales())
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("heads", HEADS.values(), ids=HEADS.keys())
def test_ragged_batch(heads, device):
    # whole prompts, a chunk after a cached prefix (queries at the end of the sequence), single tokens, and
    # lengths that are multiples of neither the 4-token cache block nor the kernel's tiles
    _check(device, query_lens=[1, 7, 5, 1, 22], seq_lens=[1, 7, 19, 9, 22], heads=heads)


def test_bfloat16(device):
    _check(device, query_lens=[6, 11], seq_lens=[6, 30], dtype=torch.bfloat16, heads=(8, 2))


def test_long_prefix_and_several_query_tiles(device):
    # a 90-token prefix puts whole key tiles left of the diagonal (the unmasked loop); 150 queries span several
    # query tiles
    _check(device, query_lens=[10, 150], seq_lens=[100, 150], heads=(2, 1), block_size=16)


@pytest.mark.parametrize("window", [1, 4, 37])
def test_sliding_window(window, device):
    _check(device, query_lens=[9, 20, 1], seq_lens=[30, 20, 12], window=window)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
def test_head_dims(head_dim, device):
    _check(device, query_lens=[5, 3], seq_lens=[5, 11], heads=(2, 1), head_dim=head_dim, block_size=8)


@pytest.mark.parametrize("kv_dtype", [torch.int8, torch.float8_e4m3fn])
def test_quantized_cache(kv_dtype, device):
    _check(device, query_lens=[6, 13], seq_lens=[20, 13], kv_dtype=kv_dtype)


def test_empty(device):
    _check(device, query_lens=[], seq_lens=[])
    _check(device, query_lens=[3, 0, 2], seq_lens=[3, 5, 4])  # a sequence with no new tokens this step


def test_rejects_bad_inputs(device):
    kv = PagedKV([5], 2, 16, 4, torch.float32, None, device)
    q = torch.randn(5, 4, 16, device=device)
    with pytest.raises(ValueError, match="do not describe"):
        tri.prefill_attention(q, *kv.args(), kv.block_tables, [4], [5], 0.25)
    with pytest.raises(ValueError, match="query_len must be in"):
        tri.prefill_attention(q, *kv.args(), kv.block_tables, [5], [4], 0.25)
    with pytest.raises(ValueError, match="multiple of"):
        tri.prefill_attention(q[:, :3], *kv.args(), kv.block_tables, [5], [5], 0.25)
    with pytest.raises(ValueError, match="needs more than"):
        tri.prefill_attention(q, *kv.args(), kv.block_tables[:, :1], [5], [5], 0.25)
    with pytest.raises(ValueError, match="needs k_scale"):
        tri.prefill_attention(q, kv.k_cache.to(torch.int8), kv.v_cache.to(torch.int8), kv.block_tables, [5], [5],
                              0.25)
