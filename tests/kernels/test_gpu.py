"""The kernels compiled and run on a CUDA GPU, at the sizes real models use, against the twin."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from paged_inputs import TOL, PagedKV  # noqa: E402

from turboinfer.kernels.torch_ref import attention as ref  # noqa: E402
from turboinfer.kernels.triton import decode, prefill, store_kv  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CUDA = torch.device("cuda")
BF16 = torch.bfloat16
QUANT_TOL = dict(atol=3e-2, rtol=3e-2)  # the twin dequantizes K/V to bf16 first; the kernels scale in float32


@pytest.mark.parametrize("kv_dtype", [BF16, torch.int8, torch.float8_e4m3fn])
def test_store_kv(kv_dtype):
    torch.manual_seed(0)
    num_tokens, shape = 4096, (600, 16, 8, 128)
    key = torch.randn(num_tokens, 8, 128, device=CUDA, dtype=BF16) * 3
    value = torch.randn(num_tokens, 8, 128, device=CUDA, dtype=BF16)
    slots = torch.randperm(shape[0] * shape[1], device=CUDA)[:num_tokens]
    quant = kv_dtype != BF16
    caches = []
    for _ in range(2):
        c = [torch.zeros(shape, dtype=kv_dtype, device=CUDA) for _ in range(2)]
        c += [torch.zeros(shape[:3], device=CUDA) for _ in range(2)] if quant else [None, None]
        caches.append(c)
    ref.store_kv(key, value, caches[0][0], caches[0][1], slots, *caches[0][2:])
    store_kv.store_kv(key, value, caches[1][0], caches[1][1], slots, *caches[1][2:])
    for want, got in zip(*caches):
        if want is not None:
            assert torch.equal(ref._raw(want).view(torch.uint8), ref._raw(got).view(torch.uint8))


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (16, 1)], ids=["gqa", "mha", "mqa"])
def test_prefill(heads, head_dim):
    # a whole 2k prompt, a 512-token chunk after a 3000-token prefix, a single token, an odd-length prompt
    query_lens, seq_lens = [2048, 512, 1, 77], [2048, 3512, 1, 77]
    kv = PagedKV(seq_lens, heads[1], head_dim, 16, BF16, None, CUDA)
    q = torch.randn(sum(query_lens), heads[0], head_dim, device=CUDA, dtype=BF16)
    args = (q, *kv.args(), kv.block_tables, query_lens, seq_lens, head_dim ** -0.5)
    torch.testing.assert_close(prefill.prefill_attention(*args), ref.prefill_attention(*args), **TOL[BF16])


@pytest.mark.parametrize("kv_dtype, window", [(BF16, 1024), (torch.int8, None), (torch.float8_e4m3fn, None),
                                              (torch.int8, 700)])
def test_prefill_window_and_quantized(kv_dtype, window):
    query_lens, seq_lens = [1500, 300], [1500, 2600]
    kv = PagedKV(seq_lens, 8, 128, 16, BF16, kv_dtype, CUDA)
    q = torch.randn(sum(query_lens), 32, 128, device=CUDA, dtype=BF16)
    args = (q, *kv.args(), kv.block_tables, query_lens, seq_lens, 128 ** -0.5, window)
    tol = TOL[BF16] if kv_dtype == BF16 else QUANT_TOL
    torch.testing.assert_close(prefill.prefill_attention(*args, **kv.scales()),
                               ref.prefill_attention(*args, **kv.scales()), **tol)


@pytest.mark.parametrize("head_dim", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (32, 32), (16, 1)], ids=["gqa", "mha", "mqa"])
def test_decode(heads, head_dim):
    seq_lens = [1, 17, 1000, 4096, 8191, 16384]
    kv = PagedKV(seq_lens, heads[1], head_dim, 16, BF16, None, CUDA)
    q = torch.randn(len(seq_lens), heads[0], head_dim, device=CUDA, dtype=BF16)
    lens = torch.tensor(seq_lens, device=CUDA)
    args = (q, *kv.args(), kv.block_tables, lens, max(seq_lens), head_dim ** -0.5)
    torch.testing.assert_close(decode.decode_attention(*args), ref.decode_attention(*args), **TOL[BF16])


@pytest.mark.parametrize("kv_dtype, window", [(BF16, 4096), (torch.int8, None), (torch.float8_e4m3fn, None),
                                              (torch.float8_e4m3fn, 1000)])
def test_decode_window_and_quantized(kv_dtype, window):
    seq_lens = [5, 3000, 32768]
    kv = PagedKV(seq_lens, 8, 128, 16, BF16, kv_dtype, CUDA)
    q = torch.randn(len(seq_lens), 32, 128, device=CUDA, dtype=BF16)
    args = (q, *kv.args(), kv.block_tables, torch.tensor(seq_lens, device=CUDA), max(seq_lens), 128 ** -0.5,
            window)
    tol = TOL[BF16] if kv_dtype == BF16 else QUANT_TOL
    torch.testing.assert_close(decode.decode_attention(*args, **kv.scales()),
                               ref.decode_attention(*args, **kv.scales()), **tol)


def test_decode_one_long_sequence_is_split():
    # batch 1 at 64k: the heuristic must cut the KV range into many splits, and the reduce must be exact
    sms = torch.cuda.get_device_properties(CUDA).multi_processor_count
    assert decode.num_kv_splits(1, 8, 65536, sms) >= 16
    kv = PagedKV([65536], 8, 128, 16, BF16, None, CUDA)
    q = torch.randn(1, 32, 128, device=CUDA, dtype=BF16)
    args = (q, *kv.args(), kv.block_tables, torch.tensor([65536], device=CUDA), 65536, 128 ** -0.5)
    torch.testing.assert_close(decode.decode_attention(*args), ref.decode_attention(*args), **TOL[BF16])
