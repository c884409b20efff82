"""Stage workers: what one pool actor does to one row, by stage name.

A registry (STYLE habit 2): ``register_stage(name, roles)`` decorates a factory
``factory(config, clients, extra) -> async fn(row) -> result row``; registering a name twice
raises, and an unknown name lists the known ones. The Ray pool (``actors.pools.StageUDF``) and the
in-process runner (tests) both look workers up here, so the per-row logic is the same code with or
without Ray.
"""

from __future__ import annotations

from typing import Any, Callable

STAGE_WORKERS: dict[str, tuple[list[str], Callable[..., Any]]] = {}


def register_stage(name: str, roles: list[str]):
    def deco(factory):
        if name in STAGE_WORKERS:
            raise ValueError(f"stage worker '{name}' registered twice")
        STAGE_WORKERS[name] = (roles, factory)
        return factory

    return deco


def lookup(name: str):
    if name not in STAGE_WORKERS:
        raise KeyError(f"unknown stage worker '{name}' (known: {', '.join(sorted(STAGE_WORKERS))})")
    return STAGE_WORKERS[name]


def _supports_schema(clients, role: str) -> bool:
    return all(p.supports_json_schema for p in clients[role].providers.values())


@register_stage("rate", ["rater"])
def _rate(config, clients, extra):
    from .rating import Rater

    if config.rate.ensemble == "all":
        from .ensemble import EnsembleRater
        from .runtime import ensemble_client_name

        raters = {}
        for p in config.providers_for("rater"):
            client = clients[ensemble_client_name(p.name)]
            schema = all(x.supports_json_schema for x in client.providers.values())
            raters[p.name] = Rater(client, config.rate, use_schema=config.rate.json_scores and schema,
                                   json_fallback=schema)
        return EnsembleRater(raters, config.rate.ensemble_rule).rate
    schema = _supports_schema(clients, "rater")
    rater = Rater(clients["rater"], config.rate, use_schema=config.rate.json_scores and schema, json_fallback=schema)
    return rater.rate


@register_stage("evolve", ["evol"])
def _evolve(config, clients, extra):
    from .evolution.evolver import Evolver
    from .evolution.methods import Method

    method = Method(**extra["method"]) if "method" in extra else None
    evolver = Evolver(clients["evol"], method, config.evolve)
    return evolver.evolve_row


@register_stage("answer", ["answer"])
def _answer(config, clients, extra):
    from .answer import Answerer

    return Answerer(clients["answer"], config.answer).answer


@register_stage("judge", ["judge"])
def _judge(config, clients, extra):
    from .judge import JUDGMENT_SCHEMA, Judge

    import pyarrow as pa

    judge = Judge(clients["judge"], config.judge, json_fallback=_supports_schema(clients, "judge"))

    async def work(row):
        out = await judge.judge(row)
        out["status"] = "failed" if out.get("result") == "failed" else "judged"
        return out

    work.first_requests = judge.first_requests  # batch mode: both orders in one round
    work.schema = JUDGMENT_SCHEMA.append(pa.field("status", pa.string())).append(pa.field("_worker", pa.string()))
    return work
