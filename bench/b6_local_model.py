"""B6 embedded model: tokens/s of the local provider through evoray (LLMClient -> LocalProvider ->
a Ray LocalModelReplica, as in a job) versus llama-cpp-python called directly in this process, on
the same prompts and settings (SmolLM2-135M Q4_1, n_ctx 2048, 1 thread each, temperature 0,
seed 0, max_tokens 64). The two are run alternately so drifting machine load hits both alike.
"""

from __future__ import annotations

import asyncio
import time

import common
from common import QUICK, figure, repeats, say, work_dir

THREADS = 1  # the job default: a replica reserves num_cpus=1 and runs llama.cpp with 1 thread
N_CTX = 2048
MAX_TOKENS = 16 if QUICK else 64
PROMPTS = [
    "Give three tips for staying healthy.",
    "Explain why the sky is blue in two sentences.",
    "Write a haiku about autumn leaves.",
    "What is the capital of France, and what is it known for?",
    "Describe how a bicycle works.",
    "List four uses of baking soda.",
    "Summarise the plot of Romeo and Juliet briefly.",
    "How do I convert Celsius to Fahrenheit?",
]


def direct_engine():
    """llama-cpp-python's ``Llama`` with the job's load settings (extra weight buffers off, see
    ``evoray.providers.local.load_llama``), called directly in this process."""
    from evoray.providers.local import load_llama, resolve_model_path

    return load_llama(resolve_model_path("smollm2-135m"), n_ctx=N_CTX, n_threads=THREADS, seed=0)


def run_direct(llm, prompts) -> tuple[int, float]:
    toks = 0
    t0 = time.perf_counter()
    for p in prompts:
        out = llm.create_chat_completion(messages=[{"role": "user", "content": p}], temperature=0.0, top_p=1.0,
                                         max_tokens=MAX_TOKENS, seed=0)
        toks += out["usage"]["completion_tokens"]
    return toks, time.perf_counter() - t0


async def run_evoray(client, prompts) -> tuple[int, float]:
    from evoray.providers.base import Request

    toks = 0
    t0 = time.perf_counter()
    for p in prompts:
        c = await client.complete(Request(messages=[{"role": "user", "content": p}], temperature=0.0, top_p=1.0,
                                          max_tokens=MAX_TOKENS, seed=0))
        toks += c.output_tokens
    return toks, time.perf_counter() - t0


def run() -> list:
    from actors.pools import worker_context
    from evoray.config import JobConfig
    from evoray.jobs import JobContext

    prompts = PROMPTS[:1] if QUICK else PROMPTS
    cfg = JobConfig.from_dict({
        "providers": [{"name": "local", "kind": "local", "model": "smollm2-135m", "n_threads": THREADS,
                       "num_cpus": 1, "n_ctx": N_CTX}],
        "output": {"dir": str(work_dir() / "b6")},
        "cache": {"enabled": False},
    })
    ctx = JobContext(cfg, quiet=True)
    ratios, evo_tps, dir_tps = [], [], []
    try:
        session = ctx.session()  # starts the replica and waits for the model to load

        async def bench_loop():
            _, clients = worker_context(session._config_json, session.job_id, ["rater"])
            client = clients["rater"]
            llm = direct_engine()
            await run_evoray(client, prompts[:1])  # warm both
            run_direct(llm, prompts[:1])
            for i in range(repeats()):
                et, es = await run_evoray(client, prompts)
                dt, ds = run_direct(llm, prompts)
                evo_tps.append(et / es)
                dir_tps.append(dt / ds)
                ratios.append((et / es) / (dt / ds))
                say(f"  B6 run {i + 1}: evoray {et} tokens in {es:.2f} s ({et / es:.1f} tok/s), direct {dt} tokens "
                    f"in {ds:.2f} s ({dt / ds:.1f} tok/s)")
            await client.aclose()

        asyncio.run(bench_loop())
    finally:
        ctx.close()
    return [
        figure("B6", "evoray local provider tok/s / direct llama-cpp-python tok/s", ratios, goal=">= 0.9",
               check=lambda v: v >= 0.9),
        figure("B6", "evoray local provider (Ray replica)", evo_tps, unit="tok/s"),
        figure("B6", "llama-cpp-python direct", dir_tps, unit="tok/s"),
    ]


if __name__ == "__main__":
    common.main_with_ray(run)
