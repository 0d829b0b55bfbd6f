"""Our torch dequantizer against the gguf package's numpy reference: exact equality, every supported type."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf import GGUFReader
from gguf import quants as ref

from turboinfer.errors import ModelLoadError, UnsupportedModelError
from turboinfer.loader.gguf_dequant import BLOCK_SIZES, dequantize

QUANTIZABLE = [T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1]  # gguf.quants can produce these from floats
# K-quants have no quantizer in gguf.quants: random bytes, with the fp16 super-block scales (byte offsets
# below) overwritten by small finite values so results are finite and comparable.
K_SCALE_OFFSETS = {T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,)}


def _reference(raw: np.ndarray, qtype) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ref.dequantize(raw, qtype), dtype=np.float32))


def test_block_sizes_match_gguf():
    from gguf import GGML_QUANT_SIZES

    for qtype, sizes in BLOCK_SIZES.items():
        assert GGML_QUANT_SIZES[T(qtype)] == sizes


@pytest.mark.parametrize("qtype", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_random_data(qtype):
    rng = np.random.default_rng(int(qtype))
    x = (rng.standard_normal((6, 4, 256)) * rng.uniform(0.01, 3, (6, 4, 1))).astype(np.float32)
    x[0, 0, :32] = 0.0  # an all-zero block (scale 0)
    raw = ref.quantize(x, qtype)
    out = dequantize(raw.view(np.uint8), int(qtype), x.shape)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.equal(out, _reference(raw, qtype).reshape(x.shape))


@pytest.mark.parametrize("qtype", list(K_SCALE_OFFSETS), ids=lambda t: t.name)
def test_k_quants_random_bytes(qtype):
    rng = np.random.default_rng(int(qtype))
    elems, nbytes = BLOCK_SIZES[int(qtype)]
    shape = (5, 3 * elems)
    raw = rng.integers(0, 256, size=(shape[0], shape[1] // elems * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in K_SCALE_OFFSETS[qtype]:
        scales = (rng.standard_normal((blocks.shape[0], 1)) * 0.02).astype(np.float16)
        blocks[:, off:off + 2] = scales.view(np.uint8)
    expected = _reference(raw, qtype)
    assert torch.isfinite(expected).all()
    assert torch.equal(dequantize(raw, int(qtype), shape), expected)
    # a torch tensor of the same bytes works too
    assert torch.equal(dequantize(torch.from_numpy(raw.copy()), int(qtype), shape), expected)


def test_real_tensors_of_default_model(default_model_path):
    reader = GGUFReader(default_model_path)
    seen: dict[int, int] = {}
    for t in reader.tensors:
        qtype = int(t.tensor_type)
        if seen.get(qtype, 0) >= 3:  # three tensors of each type keep this quick
            continue
        seen[qtype] = seen.get(qtype, 0) + 1
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists dims innermost first
        out = dequantize(t.data, qtype, shape)
        assert torch.equal(out, _reference(t.data, t.tensor_type).reshape(shape)), t.name
    assert set(seen) == {int(T.F32), int(T.Q8_0), int(T.Q4_1)}


def test_unknown_type_is_named():
    with pytest.raises(UnsupportedModelError, match="IQ4_XS"):
        dequantize(np.zeros(136, np.uint8), int(T.IQ4_XS), (256,))


def test_wrong_byte_count():
    with pytest.raises(ModelLoadError, match="needs 68 bytes"):
        dequantize(np.zeros(60, np.uint8), int(T.Q8_0), (2, 32))
    with pytest.raises(ModelLoadError, match="multiple of its block size"):
        dequantize(np.zeros(34, np.uint8), int(T.Q8_0), (1, 33))
