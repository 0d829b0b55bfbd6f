"""C kernels for the CPU decode step (decode.c), compiled on first use with the system C compiler.

The library is built for this machine's CPU (-march=native) into ~/.cache/turboinfer/kernels under a name that
hashes the source, the flags, the compiler and the CPU's feature flags, so a change to any of them rebuilds it and
a cache shared between machines never hands one CPU another's binary. Without a compiler the engine runs the
PyTorch path and says why once. The library brings its own small thread pool (pthreads), asleep between steps."""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("turboinfer")

SOURCE = Path(__file__).with_name("decode.c")
FLAGS = ("-O3", "-march=native", "-pthread", "-fPIC", "-shared", "-std=gnu11")
ENV_SWITCH = "TURBOINFER_CPU_KERNELS"  # "0" turns the C decode path off

_cache: dict[tuple[str, ...], ctypes.CDLL | None] = {}


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return os.uname().machine


def _cache_dir() -> Path:
    root = os.environ.get("TURBOINFER_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "turboinfer")
    return Path(root) / "kernels"


def enabled() -> bool:
    return os.environ.get(ENV_SWITCH, "1") not in ("0", "false", "no", "off")


def load_library(extra_flags: tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """The compiled decode library, or None (with one log line saying why) when it cannot be built."""
    key = tuple(extra_flags)
    if key in _cache:
        return _cache[key]
    lib = None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: the CPU decode step runs on the PyTorch path")
    else:
        try:
            lib = _build(compiler, FLAGS + key)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", "") or str(e)
            log.warning("building the CPU decode kernels failed, using the PyTorch path: %s", detail[-500:])
    _cache[key] = lib
    return lib


def _build(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    digest = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), version, _cpu_flags()]).encode())
    target = _cache_dir() / f"decode-{digest.hexdigest()[:16]}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: processes compiling at once never load a half-written file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE), "-lm"], check=True, capture_output=True,
                           text=True)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(target))
    lib.ti_workspace_floats.restype = ctypes.c_size_t
    lib.ti_workspace_floats.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.ti_decode_step.restype = ctypes.c_int
    lib.ti_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int]
    lib.ti_int8_matmul.restype = ctypes.c_int
    lib.ti_int8_matmul.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_int]
    lib.ti_int4_to_bf16.restype = ctypes.c_int
    lib.ti_int4_to_bf16.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                    ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    return lib


def int4_to_bf16_t(lib: ctypes.CDLL, packed, scales_zeros, n: int, k: int, group: int, n0: int, n1: int,
                   nthreads: int):
    """Rows n0 .. n1 - 1 (multiples of 64) of a weight in torch's CPU int4 packing, as its transpose W^T [K, n1 - n0]
    in bf16 (each weight (q - 8) s + z8 rounded to nearest even)."""
    import torch

    out = torch.empty(k, n1 - n0, dtype=torch.bfloat16)
    rc = lib.ti_int4_to_bf16(packed.data_ptr(), scales_zeros.data_ptr(), n, k, group, n0 // 64, n1 // 64,
                             out.data_ptr(), n1 - n0, nthreads)
    if rc != 0:
        raise ValueError(f"int4 -> bf16: rows {n0}..{n1} of an [{n}, {k}] weight (group {group}) not supported")
    return out


def grouped_int8_matmul(lib: ctypes.CDLL, x, w, nthreads: int):
    """x [M, K] (any float dtype) times a GroupedInt8Weight's transpose -> [M, N] float32, on the library's threads."""
    import torch

    m, k = x.shape
    n = w.shape[0]
    x = x.float().contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    work = torch.empty(m * (k // 2 + k // 16 + 2) + 1, dtype=torch.float32)
    rc = lib.ti_int8_matmul(x.data_ptr(), m, k, n, w.group_size, w.q.data_ptr(), w.scale.data_ptr(),
                            None if w.zero is None else w.zero.data_ptr(), y.data_ptr(), work.data_ptr(), nthreads)
    if rc != 0:
        raise ValueError(f"int8 matmul: group {w.group_size} / in_features {k} not supported by the C kernel")
    return y
