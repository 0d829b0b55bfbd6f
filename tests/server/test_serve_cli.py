"""`turboinfer serve` flags (no model is loaded here)."""

from __future__ import annotations

import pytest

from turboinfer.cli import build_parser, main


def test_serve_flags_parse():
    args = build_parser().parse_args([
        "serve", "--model", "m.gguf", "--port", "9000", "--api-key", "k", "--served-model-name", "mine",
        "--max-waiting-requests", "3", "--max-tokens-limit", "64", "--max-num-seqs", "8", "--kv-cache-memory", "1GiB"])
    assert (args.model, args.port, args.host, args.api_key, args.served_model_name) == ("m.gguf", 9000, "127.0.0.1",
                                                                                         "k", "mine")
    assert (args.max_waiting_requests, args.max_tokens_limit, args.max_num_seqs) == (3, 64, 8)
    assert not hasattr(args, "seed")  # requests carry their own seed


@pytest.mark.parametrize("flags,message", [(["--port", "70000"], "--port"),
                                           (["--max-waiting-requests", "-1"], "--max-waiting-requests"),
                                           (["--max-tokens-limit", "0"], "--max-tokens-limit")])
def test_bad_flags_fail_before_loading(flags, message, capsys):
    assert main(["serve", *flags]) == 2
    assert message in capsys.readouterr().err
