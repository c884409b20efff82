"""Per-stage progress: a live rich display on a terminal, plain periodic lines otherwise.

Shows rows done / total, rate, ETA, tokens, dollars, 429s and failures. ``--quiet`` prints
nothing (errors still go to stderr). The numbers for tokens, dollars and 429s come from the job's
ledger (polled from the gate), rows from the stage's own counts.

The watchdog: when no row has finished for ``stall_s`` seconds (``ray.stall_warning_s``), a line
says so with what ``status_fn`` reports (requests in flight, each provider's state, free CPUs),
and again every ``stall_s`` seconds while the stall lasts. It is printed with ``--quiet`` too: a
run that has stopped moving is what a quiet user must hear about. A thread checks once a second;
:meth:`StageProgress.check_stall` is the check itself, with the clock passed in.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable


class StageProgress:
    def __init__(self, stage: str, total: int | None, quiet: bool = False, ledger_fn: Callable[[], dict] | None = None,
                 every_s: float = 5.0, stream=None, stall_s: float = 0.0, status_fn: Callable[[], str] | None = None,
                 clock: Callable[[], float] = time.monotonic, watch: bool = True):
        self.stage = stage
        self.total = total
        self.quiet = quiet
        self.ledger_fn = ledger_fn
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.failed = 0
        self.clock = clock
        self.t0 = clock()
        self._last = 0.0
        self._ledger: dict = {}
        self._live = None
        self._task = None
        self.stall_s = stall_s
        self.status_fn = status_fn
        self._last_row_at = self.t0
        self._stall_warned_at = 0.0  # idle seconds at the last warning of the current stall
        self.stall_lines: list[str] = []
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        if stall_s > 0 and watch:
            self._watchdog = threading.Thread(target=self._watch, name=f"evoray-watchdog-{stage}", daemon=True)
            self._watchdog.start()
        if not quiet and getattr(self.stream, "isatty", lambda: False)():
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                self._live = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                      TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                                      TextColumn("{task.fields[info]}"), transient=False)
                self._live.start()
                self._task = self._live.add_task(stage, total=total, info="")
            except Exception:
                self._live = None

    def _info(self) -> str:
        tot = (self._ledger or {}).get("total", {})
        el = max(1e-9, time.monotonic() - self.t0)
        rate = self.done / el
        eta = (self.total - self.done) / rate if self.total and rate > 0 else None
        eta_s = f"{eta:.0f}s" if eta is not None else "?"
        return (f"{rate:.1f} rows/s  ETA {eta_s}  tokens {tot.get('input_tokens', 0)}+{tot.get('output_tokens', 0)}  "
                f"${tot.get('dollars', 0.0):.4f}  429s {tot.get('rate_limited', 0)}  failed {self.failed}")

    def update(self, done: int = 0, failed: int = 0, force: bool = False) -> None:
        self.done += done
        self.failed += failed
        now = time.monotonic()
        if done:
            self._last_row_at = self.clock()
            self._stall_warned_at = 0.0
        if self.quiet:
            return
        if not force and now - self._last < (0.5 if self._live else self.every_s):
            if self._live is not None:
                self._live.update(self._task, completed=self.done)
            return
        self._last = now
        if self.ledger_fn is not None:
            try:
                self._ledger = self.ledger_fn()
            except Exception:
                pass
        if self._live is not None:
            self._live.update(self._task, completed=self.done, info=self._info())
        else:
            total = self.total if self.total is not None else "?"
            print(f"[{self.stage}] {self.done}/{total} rows  {self._info()}", file=self.stream, flush=True)

    # ---- the watchdog --------------------------------------------------------------------------------
    def check_stall(self, now: float | None = None) -> str | None:
        """The warning line when no row has finished for ``stall_s`` (then every ``stall_s``) seconds."""
        if self.stall_s <= 0 or (self.total is not None and self.done >= self.total):
            return None
        now = self.clock() if now is None else now
        idle = now - self._last_row_at
        if idle < self.stall_s or idle < self._stall_warned_at + self.stall_s:
            return None
        self._stall_warned_at = idle
        detail = ""
        if self.status_fn is not None:
            try:
                detail = self.status_fn()
            except Exception as e:
                detail = f"status unavailable: {type(e).__name__}"
        total = self.total if self.total is not None else "?"
        line = (f"[{self.stage}] no row finished for {idle:.0f} s ({self.done}/{total} rows done"
                + (f"; {detail}" if detail else "") + ")")
        self.stall_lines.append(line)
        return line

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            line = self.check_stall()
            if line:
                print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=2)
            self._watchdog = None
        if self._last < time.monotonic() - 0.2:
            self.update(force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
