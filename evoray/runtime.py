"""Building the clients a stage needs, in whichever process runs it.

``build_clients(config, roles, gate, local_replicas)`` gives one :class:`~evoray.client.LLMClient`
per role. Provider objects (and their SDK clients) are shared by the roles of one process and are
built here, inside the process and event loop that uses them: configs and names cross process
boundaries, live clients never do.
"""

from __future__ import annotations

from .cache import ResponseCache
from .client import Gate, LLMClient
from .config import JobConfig
from .providers import build_provider, runs_locally
from .providers.base import Provider


def build_providers(config: JobConfig, names: set[str], local_replicas: dict[str, list] | None = None) -> dict[str, Provider]:
    out: dict[str, Provider] = {}
    for p in config.providers:
        if p.name not in names:
            continue
        if runs_locally(p):
            out[p.name] = build_provider(p, replicas=(local_replicas or {}).get(p.name))
        else:
            out[p.name] = build_provider(p)
    return out


def build_clients(config: JobConfig, roles: list[str], gate: Gate, local_replicas: dict[str, list] | None = None,
                  cache: ResponseCache | None | bool = True) -> dict[str, LLMClient]:
    if cache is True:
        cache = ResponseCache(config.cache.dir) if config.cache.enabled else None
    elif cache is False:
        cache = None
    names = {p.name for r in roles for p in config.providers_for(r)}
    providers = build_providers(config, names, local_replicas)
    out = {
        r: LLMClient([providers[p.name] for p in config.providers_for(r)], gate, cache=cache)
        for r in roles
    }
    if "rater" in roles and config.rate.ensemble == "all":
        # the ensemble asks every rater for every row: one client per provider ("rater:NAME"),
        # on the same gate and cache, so each keeps its own limits and ledger lines
        for p in config.providers_for("rater"):
            out[ensemble_client_name(p.name)] = LLMClient([providers[p.name]], gate, cache=cache)
    return out


def ensemble_client_name(provider: str) -> str:
    return f"rater:{provider}"
