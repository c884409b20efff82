"""The built-in stages, one module each; importing this package registers them in pipeline order
(the order :func:`evoray.stage.stage_names` lists them in)."""

from . import ingest, optimize, evolve, answer, rate, judge  # noqa: F401  (registration order)
