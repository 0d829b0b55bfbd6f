"""`turboinfer quantize` end to end, through the same entry point as the console script."""

from __future__ import annotations

import json

from turboinfer.cli import main


def test_quantize_then_generate(qwen2_model, tmp_path, capsys):
    path, _ = qwen2_model
    out = tmp_path / "awq"
    assert main(["quantize", path, str(out), "--method", "awq", "--group-size", "32", "--dtype", "float32"]) == 0
    assert "linear layers quantized (awq)" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["quantization_config"]["awq"] is True
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    assert main(["generate", "The quick brown fox", "--model", str(out), "--max-tokens", "4", "--temperature", "0",
                 "--dtype", "float32", "--kv-cache-memory", "16MiB", "--num-threads", "1"]) == 0
    assert capsys.readouterr().out.strip()


def test_quantize_errors_are_one_line(qwen2_model, tmp_path, capsys):
    from gguf_writer import write_gguf_file

    gguf = write_gguf_file(tmp_path / "m.gguf", "llama", {"token_embd.weight": [[0.0] * 4] * 8})
    assert main(["quantize", gguf, str(tmp_path / "o"), "--method", "int4"]) == 2
    assert "GGUF" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("")
    assert main(["quantize", qwen2_model[0], str(busy), "--method", "int8"]) == 2
    assert "not empty" in capsys.readouterr().err
