"""The CPU decode library's interface check at load (kernels/cpu/__init__.py): the library describes its enums
(ti_interface()), and one that disagrees with runner/cpu_decode.py's declaration is refused, with the log naming
the first difference, so the engine runs the PyTorch path instead of reading the wrong pointer."""

from __future__ import annotations

import logging
import shutil
import tomllib
from pathlib import Path

import pytest
import torch

from tiny_models import make_tiny_model
from turboinfer import LLM, SamplingParams
from turboinfer.kernels import cpu as cpu_kernels
from turboinfer.runner import cpu_decode

pytestmark = pytest.mark.skipif(cpu_kernels.load_library() is None, reason="no C compiler for the CPU kernels")

SWAPPED = list(cpu_decode.DIMS)
SWAPPED[2], SWAPPED[3] = SWAPPED[3], SWAPPED[2]
MISMATCHES = [  # (what Python declares differently, the reason the log must give)
    (cpu_decode, "DIMS", tuple(SWAPPED), "dims[2] is 'heads' in the library but 'kv_heads' in Python"),
    (cpu_decode, "LAYER_PTRS", cpu_decode.LAYER_PTRS[:-1],
     "layer_ptrs[29] is 'gu2_z' in the library but nothing in Python (30 against 29 entries"),
    (cpu_decode, "LOGITS_INT8", 3, "logits[2] is 'int8' in the library but '?' in Python"),
    (cpu_decode, "KV_KINDS", {torch.bfloat16: 0, torch.float32: 1, torch.int8: 2},
     "kv_kinds[0] is 'float32' in the library but 'bfloat16' in Python"),
    (cpu_kernels, "ABI_VERSION", cpu_kernels.ABI_VERSION + 1,
     f"abi[0] is '{cpu_kernels.ABI_VERSION}' in the library but '{cpu_kernels.ABI_VERSION + 1}' in Python"),
]


def test_library_matches_declaration():
    lib = cpu_kernels.load_library()
    assert cpu_kernels.interface_mismatch(lib) is None
    assert lib.ti_interface().decode().splitlines()[1] == "dims " + ",".join(cpu_decode.DIMS)


@pytest.mark.parametrize("module, name, value, reason", MISMATCHES, ids=[m[1] for m in MISMATCHES])
def test_mismatched_declaration_is_refused(monkeypatch, caplog, module, name, value, reason):
    monkeypatch.setattr(module, name, value)
    monkeypatch.setattr(cpu_kernels, "_logged", set())
    with caplog.at_level(logging.WARNING, logger="turboinfer"):
        assert cpu_kernels.load_library() is None
    assert "does not match its Python declaration, using the PyTorch path" in caplog.text
    assert reason in caplog.text, caplog.text
    monkeypatch.undo()
    assert cpu_kernels.load_library() is not None  # the same build, accepted again


def test_refused_library_falls_back_to_pytorch(tmp_path_factory, monkeypatch):
    """An engine built while the declaration disagrees has no C step and generates on the PyTorch path."""
    path = make_tiny_model(tmp_path_factory, "llama-gqa-llama3rope-tied")[0]
    kw = dict(dtype="float32", quantization="int4", quant_group_size=32, max_model_len=128, kv_cache_memory="8MiB",
              num_threads=2)
    assert LLM(path, **kw).engine.executor.worker.runner.cpu_decoder is not None
    monkeypatch.setattr(cpu_decode, "DIMS", tuple(SWAPPED))
    llm = LLM(path, **kw)
    assert llm.engine.executor.worker.runner.cpu_decoder is None
    out = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 12


def test_cache_key_covers_every_part(tmp_path, monkeypatch):
    """A change to any file the unity build includes names a new library (so it is rebuilt), and the package
    ships every such file."""
    for p in cpu_kernels.sources():
        shutil.copy(p, tmp_path)
    monkeypatch.setattr(cpu_kernels, "SOURCE", tmp_path / "decode.c")
    compiler = shutil.which("cc") or shutil.which("gcc")
    names = {cpu_kernels.library_path(compiler, cpu_kernels.FLAGS)}
    included = [line.split('"')[1] for line in (tmp_path / "decode.c").read_text().splitlines()
                if line.startswith('#include "')]
    assert {"ti_decode.h", "step.c"} <= set(included)
    for part in included:
        with open(tmp_path / part, "a") as f:
            f.write("\n")
        names.add(cpu_kernels.library_path(compiler, cpu_kernels.FLAGS))
    assert len(names) == len(included) + 1
    with open(Path(__file__).parents[2] / "pyproject.toml", "rb") as f:
        globs = tomllib.load(f)["tool"]["setuptools"]["package-data"]["turboinfer.kernels.cpu"]
    assert all(any(Path(part).match(g) for g in globs) for part in ["decode.c", *included])
