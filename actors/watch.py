"""Noticing that Ray is gone under a job, and saying so.

Two ways Ray ends under a driver:

* the raylet of the driver's node dies (killed, OOM): the next Ray call raises
  ``LocalRayletDiedError`` or a related error; :func:`ray_loss` names those;
* the GCS (the head) dies, e.g. ``ray stop`` or a killed head node: Ray calls keep waiting, and after
  ``gcs_rpc_server_reconnect_timeout_s`` (60 s) Ray's C++ core ends the process with exit code 1,
  printing one line to file descriptor 2 and running no Python code at all.

:class:`RayWatch` covers the second: a thread that checks every ``poll_s`` that the local Ray's
``gcs_server`` and ``raylet`` processes live (for a Ray the job started) or that the GCS answers a
tiny key-value read (for a cluster it connected to: 5 missed reads in a row, about 30 s, half of
what Ray itself allows). When they are gone it interrupts the main
thread with :class:`~evoray.errors.RayLost` (a signal whose handler raises it), so the stage
writes its finished rows and the CLI prints one line and exits 1 long before Ray's own exit.
"""

from __future__ import annotations

import signal
import threading

from evoray.errors import RayLost

_SIG = signal.SIGUSR2


def ray_loss(exc: BaseException) -> str | None:
    """What a Ray exception says was lost (the local raylet, a node, the GCS), or None when the
    exception is not about Ray going away (a bug in a task, a timeout the caller chose)."""
    try:
        import ray.exceptions as rex
    except Exception:  # pragma: no cover
        return None
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        seen += 1
        if isinstance(e, RayLost):
            return e.detail
        if isinstance(e, rex.LocalRayletDiedError):
            return "the raylet of this node died"
        if isinstance(e, rex.NodeDiedError):
            return "a Ray node died"
        if isinstance(e, (rex.OwnerDiedError, rex.ObjectReconstructionFailedError)):
            return f"Ray lost objects the job needs ({type(e).__name__})"
        if isinstance(e, rex.RpcError) and "GCS" in str(e):
            return "the Ray cluster's head (GCS) stopped answering"
        if isinstance(e, rex.RaySystemError) and not isinstance(e, rex.RayTaskError):
            return f"Ray failed ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})"
        e = e.__cause__ or e.__context__
    return None


class RayWatch:
    """A daemon thread that notices a lost Ray and interrupts the main thread (see the module)."""

    def __init__(self, local: bool, poll_s: float = 1.0, probe_timeout_s: float = 5.0, misses: int = 5):
        self.local = local
        self.poll_s = poll_s
        self.probe_timeout_s = probe_timeout_s
        self.misses = misses
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._old_handler = None
        self._main = threading.main_thread()

    def start(self) -> "RayWatch":
        if threading.current_thread() is not self._main:
            return self  # a signal handler can only be installed from the main thread
        self._old_handler = signal.signal(_SIG, self._on_signal)
        self._thread = threading.Thread(target=self._run, name="evoray-ray-watch", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.probe_timeout_s + 1)
            self._thread = None
        if self._old_handler is not None and threading.current_thread() is self._main:
            signal.signal(_SIG, self._old_handler)
            self._old_handler = None

    def _on_signal(self, signum, frame):
        raise RayLost(self.lost or "Ray stopped")

    def _run(self) -> None:
        import ray

        missed = 0
        while not self._stop.wait(self.poll_s):
            if not ray.is_initialized():
                return  # shut down on purpose (a test, or the job's end before stop())
            reason = self.check_processes() if self.local else None
            if reason is None and not self.local:
                if self.probe():
                    missed = 0
                else:
                    missed += 1
                    if missed >= self.misses:
                        reason = (f"the Ray cluster's head (GCS) did not answer for "
                                  f"{missed * (self.poll_s + self.probe_timeout_s):.0f} s")
            if reason is not None and not self._stop.is_set():
                self.lost = reason
                signal.pthread_kill(self._main.ident, _SIG)
                return

    @staticmethod
    def check_processes() -> str | None:
        """For a Ray this process started: which of its core processes has ended, if any."""
        try:
            import ray._private.worker as rw

            node = rw._global_node
            procs = node.all_processes if node is not None else {}
        except Exception:
            return None
        for name, label in (("gcs_server", "GCS"), ("raylet", "raylet")):
            for info in procs.get(name, []):
                rc = info.process.poll()
                if rc is not None:
                    how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
                    return f"the local Ray's {label} process ended ({how})"
        return None

    def probe(self) -> bool:
        """True when the GCS answers a small read within ``probe_timeout_s``."""
        try:
            import ray._private.worker as rw

            rw.global_worker.gcs_client.internal_kv_get(b"evoray-probe", b"evoray", timeout=self.probe_timeout_s)
            return True
        except Exception:
            return False

