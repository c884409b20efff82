"""llama-cpp-python's own OpenAI-compatible server, as a real third-party server for tests.

``python -m evoray.testing.llama_server --model FILE.gguf --host 127.0.0.1 --port N [--n_threads 1 ...]``
runs exactly ``python -m llama_cpp.server`` (the same FastAPI app, settings and arguments; install
it with ``pip install 'llama-cpp-python[server]'``), with one change: the model loads without
llama.cpp's extra weight buffers, as :func:`evoray.providers.local.load_llama` does by default.
On an Intel Xeon with AMX (this project's CI machine) every generation of the plain server crashes
with SIGSEGV in ``ggml_backend_amx_mul_mat`` (seen with llama-cpp-python 0.3.36); its command line
has no switch for the buffers. Pass ``--extra-buffers`` to keep llama.cpp's default.

:class:`LlamaServer` starts that process on a free port of 127.0.0.1, waits until ``/v1/models``
answers, and stops it (the tests' session fixture ``llama_server`` uses it).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def _disable_extra_buffers() -> None:
    import llama_cpp.llama_cpp as lib  # the ctypes bindings, where Llama() looks the function up

    from ..providers.local import without_extra_buffers

    lib.llama_model_default_params = without_extra_buffers(lib.llama_model_default_params)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--extra-buffers" in args:
        args.remove("--extra-buffers")
    else:
        _disable_extra_buffers()
    from llama_cpp.server.__main__ import main as server_main

    sys.argv = ["llama_cpp.server", *args]
    server_main()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LlamaServer:
    """``python -m evoray.testing.llama_server`` in a subprocess: ``base_url`` once started."""

    def __init__(self, model: str | os.PathLike, *, host: str = "127.0.0.1", port: int | None = None,
                 n_threads: int = 1, n_ctx: int = 2048, log_path: str | os.PathLike | None = None,
                 extra_args: list[str] | None = None):
        self.model = Path(model)
        self.host = host
        self.port = port or _free_port(host)
        self.n_threads = n_threads
        self.n_ctx = n_ctx
        self.log_path = Path(log_path) if log_path else None
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def start(self, timeout: float = 120.0) -> "LlamaServer":
        cmd = [sys.executable, "-m", "evoray.testing.llama_server", "--model", str(self.model), "--host", self.host,
               "--port", str(self.port), "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
               "--n_ctx", str(self.n_ctx),
               *self.extra_args]
        self._log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-cpp-python's server exited with {self.proc.returncode} before answering "
                                   f"(log: {self.log_path or 'not kept'})")
            try:
                with urllib.request.urlopen(self.base_url + "/models", timeout=2) as r:
                    if json.loads(r.read()).get("data"):
                        return self
            except OSError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"llama-cpp-python's server did not answer /v1/models within {timeout:g}s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log not in (None, subprocess.DEVNULL):
            self._log.close()
        self._log = None

    def __enter__(self) -> "LlamaServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # pragma: no cover - the server process
    main()
