"""evoray: curate instruction-tuning data with LLMs on Ray.

The package is the Ray-free core (schemas, prompts, providers, limiter, cache, parsing, rating,
evolution, data io, report, CLI). Ray wrappers live in the sibling package ``actors``.
"""

__version__ = "0.1.0"
