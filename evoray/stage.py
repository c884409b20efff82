"""A stage is one object: what it is called, what it uses, what it writes, and how it runs.

A :class:`Stage` declares its name, the roles it calls, its output tables and the row status that
routes a row to each, its per-row worker factory (None for a driver-only stage such as ingest or
optimize), the ``ray.*`` key that sizes its pool, its driver ``run(ctx, input_src, outdir, **opts)``,
its cost estimate and its report section. The CLI's stage commands, the pipeline, the estimate, the
report, the CPU check and the worker lookup all read the registry (STYLE habit 2: registering a
name twice raises, an unknown name lists the known ones).

The built-in stages live in :mod:`evoray.stagedefs`, one module each; their drivers use the Ray
layer, so this module does not import them: :func:`load_builtin` loads the package by name the
first time the registry is read (a plugin load, like an entry point; nothing here imports Ray).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, runtime_checkable

#: the package whose modules register the built-in stages
BUILTIN_PACKAGE = "evoray.stagedefs"


@dataclass(frozen=True)
class ReportSection:
    """A stage's section of ``report.html``: ``rank`` orders the stage sections between the summary
    and the ledger; ``build(ctx)`` returns the section's HTML."""

    id: str
    title: str
    build: Callable[[Any], str]
    rank: int = 100


@dataclass(frozen=True)
class Command:
    """A stage's subcommand: its help, whether it reads ``-i INPUT``, extra arguments, the options
    its driver takes from the parsed arguments, and ``rank`` (the order in ``evoray --help``)."""

    help: str
    with_input: bool = True
    add_arguments: Callable[[Any], None] | None = None
    options: Callable[[Any], dict] | None = None
    rank: int = 100


@runtime_checkable
class Stage(Protocol):
    """What the CLI, the pipeline, the estimate, the report and the pools need of a stage."""

    name: str
    roles: tuple[str, ...]
    routes: dict[str, str]  # row status -> output table
    tables: tuple[str, ...]  # every table the stage writes
    worker: Callable[..., Any] | None  # factory(config, clients, extra) -> async fn(row), or None
    pool_key: str | None  # the ray.* key that sizes its actors, or None

    def run(self, ctx, input_src: str | None, outdir: Path, **options) -> Any: ...

    def estimate(self, builder, st, rows, state) -> Any: ...

    def report_section(self, ctx) -> str | None: ...

    def next_input(self, outdir: Path, fmt: str, current: str) -> str: ...

    def hand_on(self, result, outdir: Path) -> dict: ...


@dataclass
class StageDef:
    """A stage made of parts (the form every built-in stage takes).

    * ``roles``: the provider roles the stage calls (the worker's clients for a pool stage);
    * ``routes``: row status -> output table (for example rate's ``kept``/``rejected``/``failed``);
    * ``tables``: every table the stage writes, in report order (routed tables and extras such as
      ``random_baseline``); ``markers``: files that show a folder holds the stage's outputs;
    * ``worker``: ``factory(config, clients, extra) -> async fn(row) -> row`` or None;
    * ``pool_key``: the ``ray.*`` key that sizes its actors (None: no actors), ``pool_label`` what
      the actors are called, ``pool_size(config)`` how many it starts (default the key's value),
      ``ray_data``: whether Ray Data tasks feed the pool (not for optimize's candidates);
    * ``driver(ctx, input_src, outdir, **options)``: runs the stage (writes its folder, returns a
      ``StageResult``, or None for ingest); ``next_input(outdir, fmt, current)``: what the next
      pipeline stage reads;
      ``hand_on(result, outdir)``: options for later stages (optimize's best method for evolve),
      ``takes``: the options the driver accepts from earlier stages;
    * ``estimator(builder, st, rows, state) -> rows passed on`` (see :func:`evoray.estimate.estimate`),
      ``reads_rows``: the estimate needs input rows;
    * ``report``: its :class:`ReportSection` or None; ``command``: its subcommand or None;
    * ``outcomes``: the words for its row outcomes besides "failed" in the final line,
      ``note_fn(counts)`` text after them (rate's chosen threshold), or ``summary_fn(counts)`` the
      stage's whole part of the final line (optimize, which counts steps, not rows).
    """

    name: str
    roles: tuple[str, ...]
    driver: Callable[..., Any]
    estimator: Callable[..., Any]
    routes: dict[str, str] = field(default_factory=dict)
    tables: tuple[str, ...] = ()
    markers: tuple[str, ...] = ()
    worker: Callable[..., Any] | None = None
    pool_key: str | None = None
    pool_label: str = ""
    pool_sizer: Callable[[Any], int] | None = None
    ray_data: bool = True
    next_input_fn: Callable[[Path, str, str], str] | None = None
    hand_on_fn: Callable[[Any, Path], dict] | None = None
    takes: tuple[str, ...] = ()
    reads_rows: bool = False
    report: ReportSection | None = None
    command: Command | None = None
    outcomes: tuple[str, ...] = ()
    summary_fn: Callable[[dict], str] | None = None
    note_fn: Callable[[dict], str] | None = None

    def run(self, ctx, input_src: str | None, outdir: Path, **options):
        return self.driver(ctx, input_src, outdir, **options)

    def estimate(self, builder, st, rows, state):
        return self.estimator(builder, st, rows, state)

    def report_section(self, ctx) -> str | None:
        """The HTML of the stage's section of ``report.html`` (None: the stage has none)."""
        return self.report.build(ctx) if self.report is not None else None

    def pool_size(self, config) -> int:
        if self.pool_sizer is not None:
            return self.pool_sizer(config)
        return int(getattr(config.ray, self.pool_key)) if self.pool_key else 0

    def next_input(self, outdir: Path, fmt: str, current: str) -> str:
        """The next pipeline stage's input (default: this stage's input passes on)."""
        return self.next_input_fn(outdir, fmt, current) if self.next_input_fn is not None else current

    def hand_on(self, result, outdir: Path) -> dict:
        return self.hand_on_fn(result, outdir) if self.hand_on_fn is not None else {}


STAGES: dict[str, Stage] = {}
_loaded = False


def register(stage: Stage) -> Stage:
    """Add ``stage`` to the registry; a name registered twice raises. The built-in stages are loaded
    first, so they keep their pipeline order and a new stage cannot take a built-in's name."""
    load_builtin()
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' registered twice")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests that register a toy stage clean up with this)."""
    STAGES.pop(name, None)


def load_builtin() -> None:
    """Import :mod:`evoray.stagedefs` once, which registers the built-in stages in pipeline order."""
    global _loaded
    if not _loaded:
        _loaded = True  # set first: the built-in modules call register() while they load
        try:
            importlib.import_module(BUILTIN_PACKAGE)
        except BaseException:
            _loaded = False
            raise


def get_stage(name: str) -> Stage:
    load_builtin()
    if name not in STAGES:
        raise KeyError(f"unknown stage '{name}' (known: {', '.join(STAGES)})")
    return STAGES[name]


def stage_names() -> tuple[str, ...]:
    """Every registered stage, built-ins first in pipeline order (ingest, optimize, ...)."""
    load_builtin()
    return tuple(STAGES)


def stages() -> list[Stage]:
    load_builtin()
    return list(STAGES.values())
