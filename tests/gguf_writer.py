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
