"""C kernels for the CPU decode step, compiled on first use with the system C compiler.

decode.c is the one translation unit: it #includes ti_decode.h (the interface) and the parts (pool.c, ops.c,
matmul_int4.c, matmul_int8.c, attention.c, step.c). The library is built for this machine's CPU (-march=native)
into ~/.cache/turboinfer/kernels under a name that hashes every source file, the flags, the compiler and the CPU's
feature flags, so a change to any of them rebuilds it and a cache shared between machines never hands one CPU
another's binary. A library whose ti_interface() disagrees with the Python declaration (runner/cpu_decode.py's
constants, ABI_VERSION here) is refused. Without a compiler, or refused, the engine runs the PyTorch path and says
why once. The library brings its own small thread pool (pthreads), asleep between steps."""

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

SOURCE = Path(__file__).with_name("decode.c")  # the unity file: the one the compiler is given
ABI_VERSION = 1  # ti_decode.h's TI_ABI_VERSION: the entry points' arguments, as _build declares them below
FLAGS = ("-O3", "-march=native", "-pthread", "-fPIC", "-shared", "-std=gnu11")
ENV_SWITCH = "TURBOINFER_CPU_KERNELS"  # "0" turns the C decode path off

_cache: dict[tuple[str, ...], ctypes.CDLL | None] = {}
_logged: set[str] = set()  # refusals already logged


def sources() -> list[Path]:
    """Every file the build reads: decode.c and what it includes (the .c and .h files beside it)."""
    return sorted(p for p in SOURCE.parent.iterdir() if p.suffix in (".c", ".h"))


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
    """The compiled decode library, or None (with one log line saying why) when it cannot be built or does not
    match its Python declaration."""
    key = tuple(extra_flags)
    if key not in _cache:
        _cache[key] = _compile(key)
    lib = _cache[key]
    reason = None if lib is None else interface_mismatch(lib)
    if reason is not None:  # checked on every call: the declaration is Python's, and tests change it
        _log_once(f"the CPU decode library does not match its Python declaration, using the PyTorch path: {reason}")
        return None
    return lib


def _compile(key: tuple[str, ...]) -> ctypes.CDLL | None:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        log.info("no C compiler found: the CPU decode step runs on the PyTorch path")
        return None
    try:
        return _build(compiler, FLAGS + key)
    except (OSError, AttributeError, subprocess.CalledProcessError) as e:  # AttributeError: an entry point missing
        detail = getattr(e, "stderr", "") or str(e)
        log.warning("building the CPU decode kernels failed, using the PyTorch path: %s", detail[-500:])
        return None


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        log.warning("%s", message)


def interface_mismatch(lib: ctypes.CDLL) -> str | None:
    """None when the library's ti_interface() lists what Python declares, else the first difference, named.
    Its text is one "key name,name,..." line per enum of ti_decode.h, a name's index being its value."""
    from turboinfer.runner import cpu_decode  # the Python declaration (imported here: that module imports this one)

    want = {"abi": str(ABI_VERSION), **cpu_decode.c_interface()}
    got = dict(line.split(" ", 1) for line in lib.ti_interface().decode().splitlines())
    for key in sorted(want.keys() | got.keys()):
        w, g = want.get(key), got.get(key)
        if w == g:
            continue
        if w is None or g is None:
            return f"{key!r} is declared only by {'Python' if g is None else 'the library'}"
        wl, gl = w.split(","), g.split(",")
        i = next((i for i, (a, b) in enumerate(zip(wl, gl)) if a != b), min(len(wl), len(gl)))
        return (f"{key}[{i}] is {_entry(gl, i)} in the library but {_entry(wl, i)} in Python "
                f"({len(gl)} against {len(wl)} entries; the library's: {g})")
    return None


def _entry(names: list[str], i: int) -> str:
    return repr(names[i]) if i < len(names) else "nothing"


def library_path(compiler: str, flags: tuple[str, ...]) -> Path:
    """Where the build of these sources, flags, compiler and CPU is cached."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    text = [f"{p.name}\n{p.read_text()}" for p in sources()]
    digest = hashlib.sha256("\n".join([*text, " ".join(flags), version, _cpu_flags()]).encode())
    return _cache_dir() / f"decode-{digest.hexdigest()[:16]}.so"


def _build(compiler: str, flags: tuple[str, ...]) -> ctypes.CDLL:
    target = library_path(compiler, flags)
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
    lib.ti_interface.restype = ctypes.c_char_p
    lib.ti_interface.argtypes = []
    lib.ti_workspace_floats.restype = ctypes.c_size_t
    lib.ti_workspace_floats.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.ti_decode_step.restype = ctypes.c_int
    lib.ti_decode_step.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                   ctypes.c_void_p, ctypes.c_int]
    lib.ti_int8_workspace_floats.restype = ctypes.c_size_t
    lib.ti_int8_workspace_floats.argtypes = [ctypes.c_int, ctypes.c_int]
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
    work = torch.empty(lib.ti_int8_workspace_floats(m, k), dtype=torch.float32)
    rc = lib.ti_int8_matmul(x.data_ptr(), m, k, n, w.group_size, w.q.data_ptr(), w.scale.data_ptr(),
                            None if w.zero is None else w.zero.data_ptr(), y.data_ptr(), work.data_ptr(), nthreads)
    if rc != 0:
        raise ValueError(f"int8 matmul: group {w.group_size} / in_features {k} not supported by the C kernel")
    return y
