"""Fixtures: one real `turboinfer serve` (default model, 128 MiB of KV cache) shared by the whole session.

test_shutdown.py stops that server with SIGTERM, so its tests are moved to the end of the run."""

from __future__ import annotations

import os

import pytest
from live_server import start_server, wait_ready


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: item.path.name == "test_shutdown.py" and item.path.parent.name == "server")


@pytest.fixture(scope="session")
def server(default_model_path):
    srv = start_server(default_model_path)
    try:
        yield wait_ready(srv)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait()
        os.unlink(srv.log_path)


@pytest.fixture(scope="session")
def client(server):
    import openai

    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)
