"""store_kv: the Triton kernel writes exactly the rows (and for int8/fp8 the codes and scales) the twin writes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from turboinfer.kernels.torch_ref import attention as ref  # noqa: E402
from turboinfer.kernels.triton import store_kv as tri  # noqa: E402


def _caches(kv_dtype, device, num_blocks=9, block_size=5, num_kv_heads=2, head_dim=24):
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k, v = torch.zeros(shape, dtype=kv_dtype, device=device), torch.zeros(shape, dtype=kv_dtype, device=device)
    quant = kv_dtype in ref.QMAX
    ks = torch.zeros(shape[:3], device=device) if quant else None
    vs = torch.zeros(shape[:3], device=device) if quant else None
    return k, v, ks, vs


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    # bitwise, so float8 codes, signed zeros and NaNs all count
    return torch.equal(ref._raw(a).view(torch.uint8) if a.dtype.itemsize == 1 else a, ref._raw(b).view(torch.uint8)
                       if b.dtype.itemsize == 1 else b)


@pytest.mark.parametrize("dtype, kv_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
    (torch.float32, torch.int8), (torch.bfloat16, torch.int8), (torch.float32, torch.float8_e4m3fn),
])
def test_matches_twin(dtype, kv_dtype, device):
    torch.manual_seed(0)
    num_tokens = 13
    # key/value as the attention layer gets them: strided views into one fused projection output
    qkv = torch.randn(num_tokens, 3, 2, 24, device=device).to(dtype)
    qkv[:, :, :, 0] *= torch.logspace(-3, 3, num_tokens, device=device)[:, None, None].to(dtype)  # outliers
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(45, device=device)[:num_tokens]
    want, got = _caches(kv_dtype, device), _caches(kv_dtype, device)
    ref.store_kv(key, value, *want[:2], slots, *want[2:])
    tri.store_kv(key, value, *got[:2], slots, *got[2:])
    for w, g in zip(want, got):
        if w is None:
            continue
        if device.type == "cpu" and w.dtype == torch.bfloat16 and dtype == torch.float32:
            # the interpreter narrows float32 -> bfloat16 by truncation, GPUs (and torch) round to nearest
            torch.testing.assert_close(g, w, atol=0, rtol=2**-7)
        else:
            assert _same(w, g)


def test_empty_and_padding_slots(device):
    k, v, _, _ = _caches(torch.float32, device)
    tri.store_kv(torch.empty(0, 2, 24, device=device), torch.empty(0, 2, 24, device=device), k, v,
                 torch.empty(0, dtype=torch.int64, device=device))
    # a negative slot marks a padding row: nothing is written for it
    tri.store_kv(torch.ones(2, 2, 24, device=device), torch.ones(2, 2, 24, device=device), k, v,
                 torch.tensor([-1, 7], device=device))
    assert k.view(-1, 2, 24)[7].eq(1).all() and k.count_nonzero() == 48 and v.count_nonzero() == 48


def test_rejects_bad_inputs(device):
    k, v, ks, vs = _caches(torch.int8, device)
    x = torch.randn(3, 2, 24, device=device)
    slots = torch.arange(3, device=device)
    with pytest.raises(ValueError, match="k_scale"):
        tri.store_kv(x, x, k, v, slots)
    with pytest.raises(ValueError, match="key/value must both be"):
        tri.store_kv(x[:, :1], x[:, :1], k, v, slots, ks, vs)
    with pytest.raises(ValueError, match="slot_mapping"):
        tri.store_kv(x, x, k, v, slots[:2], ks, vs)
    with pytest.raises(ValueError, match="contiguous head_dim"):
        tri.store_kv(torch.randn(3, 2, 48, device=device)[..., ::2], x, k, v, slots, ks, vs)
    fk, fv, _, _ = _caches(torch.float32, device)
    with pytest.raises(ValueError, match="only for int8/fp8"):
        tri.store_kv(x, x, fk, fv, slots, ks, vs)
