"""Shared pytest fixtures. Keep this file small and importable without Ray."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the project root (public data sets), or skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"../shared/data absent: {SHARED_DATA} not found (public test data lives beside the project)")
    return SHARED_DATA


FAKE_KEY = "sk-evoray-FAKEKEY-7f3c9a1e5b2d"


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every integration test of the session (never one per test).

    4 logical CPUs on this 2-core machine: API-bound pool actors ask for 0.25 CPU each and the
    local-model replica for 1, so the pools never starve the read tasks.
    """
    ray = pytest.importorskip("ray")
    from actors.session import _quiet_ray_data

    # Ray workers inherit the environment of the process that starts Ray, so the fake keys of
    # the tests must be set before it starts (a job's own local Ray gets the user's env the same way)
    os.environ["OPENAI_API_KEY"] = FAKE_KEY
    os.environ["ANTHROPIC_API_KEY"] = FAKE_KEY

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, namespace="evoray", configure_logging=False,
                 log_to_driver=False)
    _quiet_ray_data()
    yield ray
    ray.shutdown()


@pytest.fixture
def fake_key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", FAKE_KEY)
    return FAKE_KEY


def fake_provider(server, name="fake", **kw) -> dict:
    d = {"name": name, "kind": "openai", "model": "fake-model", "base_url": server.openai_base_url,
         "max_attempts": 4, "backoff_base_s": 0.05, "backoff_max_s": 0.5, "timeout_s": 10,
         "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}
    d.update(kw)
    return d


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """llama-cpp-python's own OpenAI-compatible server with the shipped SmolLM2 GGUF, one per session.

    Started as ``python -m evoray.testing.llama_server`` (``llama_cpp.server`` with the model loaded
    without llama.cpp's extra buffers: the plain server crashes on AMX CPUs, see that module) on a
    free port of 127.0.0.1 with one thread; skipped with the reason when the server extra or the
    model package is missing.
    """
    import importlib.util

    for mod in ("llama_cpp", "fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"llama-cpp-python's server needs {mod}: pip install 'llama-cpp-python[server]'")
    from evoray.errors import ConfigError
    from evoray.providers.local import resolve_model_path
    from evoray.testing.llama_server import LlamaServer

    try:
        model = resolve_model_path("smollm2-135m")  # found with find_spec, never imported
    except ConfigError as e:
        pytest.skip(str(e))
    log = tmp_path_factory.mktemp("llama-server") / "server.log"
    srv = LlamaServer(model, n_threads=1, log_path=log).start()
    yield srv
    srv.stop()
