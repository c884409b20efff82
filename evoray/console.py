"""What the user sees: output levels, where Ray's own log lines go, and the final line.

Levels (every command takes ``--quiet`` and ``--verbose``):

* default: evoray's progress lines and per-stage summaries, the ledger, the final line;
* ``--quiet``: errors only (stderr), plus the final line naming the outputs and the counts;
* ``--verbose``: Ray's and Ray Data's own log lines on the terminal as well.

Unless ``--verbose``, a job runs inside :class:`RayLogRoute`, which sends everything Ray prints in
the driver process to ``OUTDIR/logs/ray.log``:

* file descriptor 2, where Ray's C++ core writes (for example core_worker's "constructor arguments
  in the object store" line), and the processes the driver starts (a local Ray's raylet and GCS);
  evoray's own messages keep the terminal through a duplicate of the original stderr;
* the Python loggers under ``ray`` (Ray Data's included): their console handlers are swapped for
  the file, and Python warnings raised inside Ray's package;
* the lines of Ray's worker processes that Ray forwards to the driver (``log_to_driver``), and
  the raylet's error messages to the driver (e.g. "N PYTHON worker processes have been started").

The log file's first lines say where the Ray session's own logs are. Warnings that matter to the
user (a worker killed for memory, a node lost, work waiting for CPUs, objects spilled to disk) are
said again in evoray's words, once each (:data:`MATTERS`). The final line mentions ray.log only
when something went wrong.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
import warnings
from pathlib import Path

log = logging.getLogger("evoray")

QUIET, DEFAULT, VERBOSE = "quiet", "default", "verbose"


def level_of(args) -> str:
    if getattr(args, "verbose", False):
        return VERBOSE
    if getattr(args, "quiet", False):
        return QUIET
    return DEFAULT


#: (pattern in a Ray log line, what evoray says instead); each said once per job
MATTERS: list[tuple[re.Pattern, str]] = [
    (re.compile(r"low on memory|OutOfMemoryError|killed due to .*memory", re.I),
     "Ray killed a worker because a node ran low on memory; lower ray.actor_concurrency or ray.batch_size, "
     "or give the node more memory"),
    (re.compile(r"Raylet is terminated|has been marked dead|node .* (has )?died", re.I),
     "a Ray node stopped under the job (its raylet ended)"),
    (re.compile(r"cannot be scheduled|not enough (cpus|resources)|insufficient resources|"
                r"resource request.*cannot be fulfilled", re.I),
     "Ray reports work waiting for CPUs that no node has free; pools, local-model replicas and "
     "Ray Data's tasks may not all fit (see ray.num_cpus and the pool sizes)"),
    (re.compile(r"\bSpilled \d+ MiB", re.I),
     "Ray's object store is full and spills blocks to disk (slower); ray.read_ahead_mb bounds what a stage holds"),
]


class _Matters(logging.Handler):
    """Watches Ray's records and worker lines for :data:`MATTERS` and re-says each once."""

    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.said: set[int] = set()

    def check(self, text: str) -> None:
        for i, (pat, msg) in enumerate(MATTERS):
            if i not in self.said and pat.search(text):
                self.said.add(i)
                log.warning("evoray: %s (Ray's words are in the job's logs/ray.log)", msg)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.check(record.getMessage())
        except Exception:
            pass


_active: "RayLogRoute | None" = None


def active_route() -> "RayLogRoute | None":
    return _active


def _fileno(stream) -> int | None:
    try:
        return stream.fileno()
    except Exception:
        return None


class RayLogRoute:
    """Send what Ray prints in this process to ``path`` while active (see the module docstring)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.session_logs: str | None = None
        self.matters = _Matters()
        self._file = None
        self._saved_fd: int | None = None
        self._saved_stderr = None
        self._swapped: list[tuple[logging.Logger, logging.Handler]] = []
        self._added: list[logging.Logger] = []
        self._handler: logging.Handler | None = None
        self._showwarning = None
        self._last_resort = None
        self._worker_handler = None
        self._print_to_stdstream = None
        self._lock = threading.Lock()

    # ---- entering and leaving -------------------------------------------------------------------
    def __enter__(self) -> "RayLogRoute":
        global _active
        import ray  # noqa: F401  (configures the "ray" logger)
        import ray.data  # noqa: F401  (configures the "ray.data" logger)

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8", errors="backslashreplace", buffering=1)
        self._file.write(f"---- evoray {' '.join(sys.argv[1:])} at {time.strftime('%Y-%m-%d %H:%M:%S')} ----\n")
        # 1. file descriptor 2 (Ray's C++ core and child processes) into the file; evoray's own
        #    messages keep the terminal through a duplicate of the original stderr
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except Exception:
                pass
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        self._saved_stderr = sys.stderr
        if _fileno(sys.stderr) == 2:
            sys.stderr = open(os.dup(self._saved_fd), "w", encoding=getattr(self._saved_stderr, "encoding", None) or "utf-8",
                              errors="backslashreplace", buffering=1)
        # 2. Ray's Python loggers: console handlers swapped for the file
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        names = ["ray"] + sorted(n for n in logging.root.manager.loggerDict if n.startswith("ray."))
        for name in names:
            lg = logging.getLogger(name)
            consoles = [h for h in lg.handlers
                        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
            for h in consoles:
                lg.removeHandler(h)
                self._swapped.append((lg, h))
            if consoles or name == "ray":
                lg.addHandler(self._handler)
                lg.addHandler(self.matters)
                self._added.append(lg)
        # ray.init(configure_logging=False) clears the "ray" logger's handlers, and that logger does
        # not propagate, so until ray_started() re-adds ours its records (the token-auth notice among
        # them) would reach Python's last-resort handler, i.e. the terminal: point that at the file
        self._last_resort = logging.lastResort
        logging.lastResort = logging.StreamHandler(self._file)
        logging.lastResort.setLevel(logging.WARNING)
        logging.lastResort.setFormatter(self._handler.formatter)
        # 3. Python warnings raised inside Ray's package
        self._showwarning = warnings.showwarning
        ray_dir = os.path.dirname(sys.modules["ray"].__file__)

        def showwarning(message, category, filename, lineno, file=None, line=None):
            # Ray's own warning classes (RayDeprecationWarning) point at the caller's line: Ray's too
            if str(filename).startswith(ray_dir) or getattr(category, "__module__", "").startswith("ray."):
                self.write(warnings.formatwarning(message, category, filename, lineno, line))
            else:
                self._showwarning(message, category, filename, lineno, file, line)

        warnings.showwarning = showwarning
        _active = self
        return self

    def __exit__(self, *exc) -> None:
        global _active
        _active = None
        self._detach_worker_logs()
        if self._showwarning is not None:
            warnings.showwarning = self._showwarning
        if self._last_resort is not None:
            logging.lastResort = self._last_resort
            self._last_resort = None
        for lg in self._added:
            lg.removeHandler(self._handler)
            lg.removeHandler(self.matters)
        for lg, h in self._swapped:
            lg.addHandler(h)
        self._swapped, self._added = [], []
        try:
            sys.stderr.flush()
        except Exception:
            pass
        if sys.stderr is not self._saved_stderr:
            try:
                sys.stderr.close()
            except Exception:
                pass
            sys.stderr = self._saved_stderr
        if self._saved_fd is not None:
            os.dup2(self._saved_fd, 2)
            os.close(self._saved_fd)
            self._saved_fd = None
        if self._file is not None:
            self._file.close()
            self._file = None

    # ---- writing ---------------------------------------------------------------------------------
    def write(self, text: str) -> None:
        with self._lock:
            if self._file is not None and not self._file.closed:
                self._file.write(text if text.endswith("\n") else text + "\n")

    # ---- once Ray runs -----------------------------------------------------------------------------
    def ray_started(self) -> None:
        """Called by :func:`actors.session.init_ray`: note the session's log folder and take over
        the worker lines Ray forwards to the driver."""
        try:
            import ray._private.worker as rw

            node = getattr(rw, "_global_node", None)
            if node is not None:
                self.session_logs = node.get_logs_dir_path()
                self.write(f"Ray session logs: {self.session_logs}")
        except Exception:
            pass
        ray_logger = logging.getLogger("ray")  # ray.init cleared its handlers
        for h in (self._handler, self.matters):
            if h not in ray_logger.handlers:
                ray_logger.addHandler(h)
        self._attach_worker_logs()

    def _attach_worker_logs(self) -> None:
        # the raylet's error messages ("N PYTHON worker processes have been started ...") do not go
        # through the dispatcher: the driver's listen_error_messages thread hands them straight to
        # the module's print_to_stdstream (stdout), which is looked up at call time
        try:
            import ray._private.worker as rw

            if getattr(rw, "print_to_stdstream", None) is not None and self._print_to_stdstream is None:
                self._print_to_stdstream = rw.print_to_stdstream
                rw.print_to_stdstream = self._stdstream
        except Exception:
            pass
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp
        except Exception:
            return
        with disp._lock:
            for i, (name, handler) in enumerate(disp.handlers):
                if name == "ray_print_logs":
                    self._worker_handler = handler
                    disp.handlers[i] = (name, self._worker_lines)

    def _stdstream(self, data: dict, ignore_prefix: bool = False) -> None:
        self._worker_lines(data)

    def _detach_worker_logs(self) -> None:
        if self._print_to_stdstream is not None:
            try:
                import ray._private.worker as rw

                if rw.print_to_stdstream == self._stdstream:
                    rw.print_to_stdstream = self._print_to_stdstream
            except Exception:
                pass
            self._print_to_stdstream = None
        if self._worker_handler is None:
            return
        try:
            from ray._private.ray_logging import global_worker_stdstream_dispatcher as disp

            with disp._lock:
                disp.handlers = [(n, self._worker_handler if h == self._worker_lines else h) for n, h in disp.handlers]
        except Exception:
            pass
        self._worker_handler = None

    def _worker_lines(self, data: dict) -> None:
        who = data.get("actor_name") or data.get("task_name") or ""
        pid = data.get("pid")
        ip = data.get("ip")
        where = f"{who} pid={pid}".strip() if pid not in ("raylet", "autoscaler") else str(pid)
        if ip and ip != data.get("localhost"):
            where += f", ip={ip}"
        lines = data.get("lines", [])
        if pid == "autoscaler":  # Ray shows only the autoscaler's event summaries, not its status dumps
            try:
                from ray._private.worker import filter_autoscaler_events

                lines = list(filter_autoscaler_events(lines))
            except Exception:
                pass
        for line in lines:
            self.write(f"({where}) {line}")
            self.matters.check(line)

    def where(self) -> str:
        """Where Ray's logs are, for a message: this file and the Ray session's folder."""
        s = str(self.path)
        return s + (f" (Ray session logs: {self.session_logs})" if self.session_logs else "")


class CurrentStderrHandler(logging.StreamHandler):
    """A handler writing to whatever ``sys.stderr`` is at emit time (the route swaps it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass
