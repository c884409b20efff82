"""Stage workers: what one pool actor does to one row, by stage name.

Each worker is a factory ``factory(config, clients, extra) -> async fn(row) -> result row``; a
stage object (:mod:`evoray.stage`) names its factory and its roles, and :func:`lookup` finds them
through the stage registry (an unknown name lists the known ones). The Ray pool
(``actors.pools.StageUDF``) and the in-process runner (tests, batch mode) both look workers up
here, so the per-row logic is the same code with or without Ray.
"""

from __future__ import annotations


def lookup(name: str):
    """``(roles, factory)`` of the stage ``name``'s per-row worker."""
    from .stage import STAGES, get_stage

    try:
        stage = get_stage(name)
    except KeyError:
        stage = None
    factory = getattr(stage, "worker", None)
    if factory is None:
        known = sorted(n for n, s in STAGES.items() if getattr(s, "worker", None) is not None)
        raise KeyError(f"unknown stage worker '{name}' (known: {', '.join(known)})")
    return list(stage.roles), factory


def _supports_schema(clients, role: str) -> bool:
    return all(p.supports_json_schema for p in clients[role].providers.values())


def rate_worker(config, clients, extra):
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


def evolve_worker(config, clients, extra):
    from .evolution.evolver import Evolver
    from .evolution.methods import Method

    method = Method(**extra["method"]) if "method" in extra else None
    evolver = Evolver(clients["evol"], method, config.evolve)
    return evolver.evolve_row


def answer_worker(config, clients, extra):
    from .answer import Answerer

    return Answerer(clients["answer"], config.answer).answer


def judge_worker(config, clients, extra):
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
