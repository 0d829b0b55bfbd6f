"""Write small GGUF files for tests."""

import gguf
import numpy as np


def write_gguf_file(path, arch: str, tensors: dict, kv: dict | None = None) -> str:
    """A small GGUF file. `tensors`: name -> float array (stored as F32) or (uint8 bytes, ggml type).
    Array shapes are numpy order; the writer stores them reversed, as llama.cpp does."""
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in (kv or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_array(key, list(value))
    for name, t in tensors.items():
        if isinstance(t, tuple):
            w.add_tensor(name, t[0], raw_dtype=t[1])
        else:
            w.add_tensor(name, np.ascontiguousarray(t, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return str(path)


def quantize_q6_k(w: np.ndarray) -> np.ndarray:
    """[n, k] float32 -> Q6_K blocks [n, k / 256 * 210] uint8 (round-to-nearest with one scale per 16; gguf's
    own quantizer has no K-quants). Layout as ggml's block_q6_K: ql[128], qh[64], scales int8[16], d f16."""
    n = w.shape[0]
    x = w.reshape(-1, 16, 16).astype(np.float32)  # [super-blocks, sub-blocks, 16]
    sub = np.abs(x).max(-1) / 31
    d = (sub.max(-1) / 127).astype(np.float16)
    sc = np.where(d[:, None] > 0, np.round(sub / np.maximum(d[:, None].astype(np.float32), 1e-30)), 0)
    sc = sc.clip(-128, 127).astype(np.int8)
    eff = d[:, None].astype(np.float32) * sc
    q = np.where(eff[..., None] > 0, np.round(x / np.where(eff > 0, eff, 1)[..., None]), 0).clip(-32, 31) + 32
    q = q.astype(np.uint8).reshape(-1, 2, 4, 32)  # [super-blocks, half, quarter, 32]
    low = q & 15
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=-1)  # [sb, 2, 64]
    qh = (q[:, :, 0] >> 4) | ((q[:, :, 1] >> 4) << 2) | ((q[:, :, 2] >> 4) << 4) | ((q[:, :, 3] >> 4) << 6)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8),
                             d.reshape(-1, 1).view(np.uint8)], axis=-1)
    return blocks.reshape(n, -1)


def quantize_q5_k(w: np.ndarray) -> np.ndarray:
    """[n, k] float32 -> Q5_K blocks [n, k / 256 * 176] uint8 (scale and min per 32, 6-bit each, packed as ggml's
    get_scale_min_k4 reads them). Layout: d f16, dmin f16, scales[12], qh[32], qs[128]."""
    n = w.shape[0]
    x = w.reshape(-1, 8, 32).astype(np.float32)
    lo = np.minimum(x.min(-1), 0)
    step = (x.max(-1) - lo) / 31
    d = (step.max(-1) / 63).astype(np.float16)
    dmin = ((-lo).max(-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(step / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dminf > 0, np.round(-lo / np.where(dminf > 0, dminf, 1)), 0).clip(0, 63).astype(np.uint8)
    scale, offset = df * sc, dminf * mn
    q = np.where(scale[..., None] > 0, np.round((x + offset[..., None]) / np.where(scale > 0, scale, 1)[..., None]),
                 0).clip(0, 31).astype(np.uint8)  # [sb, 8, 32]
    packed = np.concatenate([(sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6), (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=-1)
    qh = np.zeros((x.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= ((q[:, j] >> 4) & 1) << j
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)  # chunk c: sub-block 2c low, 2c + 1 high nibbles
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, qh, qs],
                            axis=-1)
    return blocks.reshape(n, -1)


def rewrite_gguf(src: str, dst: str, retype: dict, add: dict | None = None) -> str:
    """A copy of the GGUF file `src` (metadata and tensors) with the tensors named in `retype` (GGUF names) stored in
    another type: dequantized with the gguf package, then quantized to Q8_0 (gguf's quantizer), Q6_K or Q5_K (the
    ones above). `add`: new tensor name -> (source tensor name, type), e.g. an untied output.weight."""
    from gguf import GGMLQuantizationType as T
    from gguf import GGUFReader, GGUFValueType, GGUFWriter, quants

    encoders = {T.Q6_K: quantize_q6_k, T.Q5_K: quantize_q5_k, T.Q8_0: lambda w: quants.quantize(w, T.Q8_0)}
    reader = GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = GGUFWriter(dst, arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    jobs = [(t.name, t, retype.get(t.name)) for t in reader.tensors]
    by_name = {t.name: t for t in reader.tensors}
    jobs += [(name, by_name[source], qtype) for name, (source, qtype) in (add or {}).items()]
    for name, t, qtype in jobs:
        if qtype is not None:
            qtype = T(qtype)
            w = quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            writer.add_tensor(name, encoders[qtype](w), raw_dtype=qtype)
        elif t.tensor_type in (T.F32, T.F16):
            writer.add_tensor(name, np.array(t.data))
        else:
            writer.add_tensor(name, np.array(t.data), raw_dtype=t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


# Q4_K, Q5_K, Q6_K, Q8_0, Q5_0, Q5_1: where the fp16 scales are
SCALE_OFFSETS = {12: (0, 2), 13: (0, 2), 14: (208,), 8: (0,), 6: (0,), 7: (0, 2)}


def random_blocks(qtype, n: int, k: int, seed: int) -> np.ndarray:
    """Random blocks of `qtype` for an [n, k] matrix with small finite fp16 scales (every code pattern occurs)."""
    rng = np.random.default_rng(seed)
    from turboinfer.loader.gguf_dequant import BLOCK_SIZES

    elems, nbytes = BLOCK_SIZES[int(qtype)]
    raw = rng.integers(0, 256, size=(n, k // elems * nbytes), dtype=np.uint8)
    blocks = raw.reshape(-1, nbytes)
    for off in SCALE_OFFSETS[int(qtype)]:
        blocks[:, off:off + 2] = (rng.standard_normal((blocks.shape[0], 1)) * 0.02).astype(np.float16).view(np.uint8)
    return raw
