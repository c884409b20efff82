"""Per-stage progress: a live rich display on a terminal, plain periodic lines otherwise.

Shows rows done / total, rate, ETA, tokens, dollars, 429s and failures. ``--quiet`` prints
nothing (errors still go to stderr). The numbers for tokens, dollars and 429s come from the job's
ledger (polled from the gate), rows from the stage's own counts.
"""

from __future__ import annotations

import sys
import time
from typing import Callable


class StageProgress:
    def __init__(self, stage: str, total: int | None, quiet: bool = False, ledger_fn: Callable[[], dict] | None = None,
                 every_s: float = 5.0, stream=None):
        self.stage = stage
        self.total = total
        self.quiet = quiet
        self.ledger_fn = ledger_fn
        self.every_s = every_s
        self.stream = stream or sys.stderr
        self.done = 0
        self.failed = 0
        self.t0 = time.monotonic()
        self._last = 0.0
        self._ledger: dict = {}
        self._live = None
        self._task = None
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

    def close(self) -> None:
        if self._last < time.monotonic() - 0.2:
            self.update(force=True)
        if self._live is not None:
            self._live.stop()
            self._live = None
