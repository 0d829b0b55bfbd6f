"""`turboinfer serve`: the OpenAI-compatible server (and its chat page) on uvicorn."""

from __future__ import annotations

import argparse
import os
import signal
import sys

from turboinfer.config import EngineConfig, add_cli_args, from_cli_args
from turboinfer.errors import InvalidRequestError


def add_parser(subparsers) -> argparse.ArgumentParser:
    help_text = "serve the OpenAI-compatible API, Prometheus metrics and a chat page over HTTP"
    p = subparsers.add_parser("serve", help=help_text, description=help_text)
    add_cli_args(p, EngineConfig, skip=("seed",))  # requests carry their own seed
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 routes "
                   "(default: $TURBOINFER_API_KEY; unset: no key)")
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the model's name)")
    p.add_argument("--max-waiting-requests", type=int, default=None,
                   help="answer 503 + Retry-After while this many requests wait for a slot (default: no limit)")
    p.add_argument("--max-tokens-limit", type=int, default=None,
                   help="most tokens one request may generate; a larger max_tokens gets a 400 "
                        "(default: whatever fits the context)")
    p.add_argument("--graceful-shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM, seconds to let in-flight requests finish before aborting them (default: 30)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn log level (default: info)")
    return p


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from turboinfer.engine.async_engine import AsyncEngine
    from turboinfer.server.app import build_app

    if not 0 <= args.port <= 65535:
        raise InvalidRequestError(f"--port must be in [0, 65535], got {args.port}")
    for flag in ("max_waiting_requests", "max_tokens_limit"):
        value = getattr(args, flag)
        if value is not None and value < (0 if flag == "max_waiting_requests" else 1):
            raise InvalidRequestError(f"--{flag.replace('_', '-')} must be >= "
                                      f"{0 if flag == 'max_waiting_requests' else 1}, got {value}")
    cfg = from_cli_args(args, EngineConfig)
    api_key = args.api_key or os.environ.get("TURBOINFER_API_KEY") or None
    print(f"Loading {cfg.model} ...", file=sys.stderr, flush=True)
    async_engine = AsyncEngine.from_config(cfg)
    info = async_engine.info
    name = args.served_model_name or info.model
    url = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"
    print("\n".join(info.banner()), file=sys.stderr)
    print(f"Serving {info.model} as {name!r}", file=sys.stderr, flush=True)
    print(f"Chat page: {url}/   OpenAI API: {url}/v1   metrics: {url}/metrics"
          f"{'   (API key required)' if api_key else ''}", file=sys.stderr, flush=True)
    aliases = tuple(a for a in (cfg.model, info.model) if a != name)
    app = build_app(async_engine, name, api_key, args.max_waiting_requests, max_tokens_limit=args.max_tokens_limit,
                    model_aliases=aliases)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           timeout_graceful_shutdown=args.graceful_shutdown_timeout))
    # uvicorn re-raises SIGTERM once its graceful shutdown is done; a no-op handler underneath lets that end
    # in a normal exit (status 0) instead of death by signal.
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
        async_engine.shutdown(abort=True)  # already done by the app's shutdown unless startup failed
    return 0 if server.started else 1
