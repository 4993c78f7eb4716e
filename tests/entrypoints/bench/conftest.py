"""Fixtures for the bench tests: the fake OpenAI server running in a thread on a free port."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
import threading
import time
from dataclasses import dataclass

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FAKE_SERVER_PATH = os.path.join(HERE, "fake_openai_server.py")


def _load_fake_server_module():
    spec = importlib.util.spec_from_file_location("bench_fake_openai_server", FAKE_SERVER_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


fake = _load_fake_server_module()


@dataclass
class FakeServer:
    base_url: str
    state: object  # fake.FakeState


@pytest.fixture(scope="session")
def _fake_server_running():
    import uvicorn

    state = fake.FakeState()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(fake.make_app(state), log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "the fake server did not start"
        time.sleep(0.02)
    yield FakeServer(f"http://127.0.0.1:{port}", state)
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def fake_server(_fake_server_running) -> FakeServer:
    """The running fake server, its behaviour and records reset for this test."""
    state = _fake_server_running.state
    fresh = fake.FakeState()
    for name in vars(fresh):
        setattr(state, name, getattr(fresh, name))
    return _fake_server_running


@pytest.fixture(scope="session")
def fake_server_script() -> str:
    return FAKE_SERVER_PATH
