"""The gate: shared rpm / tpm / concurrency limits, 429 pauses, failover cool-downs (fake clock)."""

import asyncio

import pytest

from evoray.config import ProviderConfig
from evoray.errors import BudgetExceeded
from evoray.gate import Gatekeeper, TokenBucket
from evoray.testing.clock import TokenBucketModel, run_virtual


def cfg(name="p", **kw):
    return ProviderConfig(name=name, kind="openai", model="m", **kw)


def test_four_actors_share_one_rpm_and_never_exceed_the_provider_window():
    keeper = Gatekeeper([cfg(rpm=600)])
    times = []

    async def actor(n):
        loop = asyncio.get_running_loop()
        for _ in range(n):
            g = await keeper.acquire(["p"], 0)
            times.append(loop.time())
            await keeper.release(g, "p", ok=True)

    async def main():
        await asyncio.gather(*(actor(300) for _ in range(4)))

    run_virtual(main())
    assert len(times) == 1200
    server = TokenBucketModel(600, burst_seconds=1.0)  # "about 10 requests in any one second"
    for t in sorted(times):
        server.offer(t)
    assert server.rejected == 0
    # and the whole limit is used: 1200 requests at 10/s take just under 120 s of virtual time
    span = max(times) - min(times)
    assert 118.0 <= span <= 120.5


def test_tpm_estimate_then_correction_refunds_unused_tokens():
    keeper = Gatekeeper([cfg(tpm=6000)])  # 100 tokens/s, bucket of 50 tokens (0.5 s)
    times = []

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(20):
            g = await keeper.acquire(["p"], 50)
            times.append(loop.time())
            await keeper.release(g, "p", ok=True, used_tokens=10)  # 40 tokens back each time

    run_virtual(main())
    # with the refund each request really costs 10 tokens: 20 requests in about 1.5 s, not 10 s
    assert max(times) < 3.0


def test_max_concurrency_is_enforced_across_callers():
    keeper = Gatekeeper([cfg(max_concurrency=3)])
    inflight = 0
    peak = 0

    async def call():
        nonlocal inflight, peak
        g = await keeper.acquire(["p"], 0)
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(1.0)
        inflight -= 1
        await keeper.release(g, "p", ok=True)

    async def main():
        await asyncio.gather(*(call() for _ in range(12)))

    run_virtual(main())
    assert peak == 3


def test_a_429_pauses_every_caller_for_the_advised_time():
    keeper = Gatekeeper([cfg(max_concurrency=100)])
    grants = []

    async def main():
        loop = asyncio.get_running_loop()
        g = await keeper.acquire(["p"], 0)
        await keeper.release(g, "p", ok=False, status=429, retry_after=7.0)
        t0 = loop.time()

        async def one():
            await keeper.acquire(["p"], 0)
            grants.append(loop.time() - t0)

        await asyncio.gather(*(one() for _ in range(5)))

    run_virtual(main())
    assert all(g >= 7.0 for g in grants)


def test_failing_provider_cools_down_and_share_moves_to_the_other():
    keeper = Gatekeeper([cfg("bad", failures_before_cooldown=2, cooldown_s=60), cfg("good")])
    picked = []

    async def main():
        for _ in range(20):
            g = await keeper.acquire(["bad", "good"], 0)
            picked.append(g.provider)
            await keeper.release(g, g.provider, ok=g.provider == "good", health_failure=g.provider == "bad")

    run_virtual(main())
    assert picked.count("bad") == 2  # two failures in a row, then out for the cool-down
    assert picked[-10:] == ["good"] * 10


def test_spreading_follows_weights_when_both_have_headroom():
    keeper = Gatekeeper([cfg("a", weight=3), cfg("b", weight=1)])
    picked = []

    async def main():
        for _ in range(400):
            g = await keeper.acquire(["a", "b"], 0)
            picked.append(g.provider)
            await keeper.release(g, g.provider, ok=True)

    run_virtual(main())
    assert picked.count("a") == 300 and picked.count("b") == 100


def test_two_limited_providers_give_twice_the_rate():
    keeper = Gatekeeper([cfg("a", rpm=600), cfg("b", rpm=600)])
    times = []

    async def worker():
        loop = asyncio.get_running_loop()
        for _ in range(100):
            g = await keeper.acquire(["a", "b"], 0)
            times.append((loop.time(), g.provider))
            await keeper.release(g, g.provider, ok=True)

    async def main():
        await asyncio.gather(*(worker() for _ in range(8)))

    run_virtual(main())
    assert len(times) == 800
    span = max(t for t, _ in times)
    # 800 requests over two 10/s providers: about 40 s, where one provider alone would need 80 s
    assert span <= 41.0
    for name in ("a", "b"):
        server = TokenBucketModel(600)
        for t, _ in sorted(x for x in times if x[1] == name):
            server.offer(t)
        assert server.rejected == 0


def test_budget_stops_new_permits():
    keeper = Gatekeeper([cfg(price={"input_per_mtok": 1e6, "output_per_mtok": 0})], budget_usd=1.0)
    keeper.record({"p": {"requests": 1, "succeeded": 1, "input_tokens": 2, "dollars": 2.0, "model": "m"}})

    async def main():
        await keeper.acquire(["p"], 0)

    with pytest.raises(BudgetExceeded):
        run_virtual(main())


def test_dead_holder_permit_is_reclaimed_after_its_lease():
    keeper = Gatekeeper([cfg(max_concurrency=1)], lease_s=5.0)

    async def main():
        loop = asyncio.get_running_loop()
        await keeper.acquire(["p"], 0)  # never released: its holder "died"
        t0 = loop.time()
        await keeper.acquire(["p"], 0)
        return loop.time() - t0

    waited = run_virtual(main())
    assert 5.0 <= waited <= 7.0


def test_token_bucket_debt_delays_the_next_grant():
    async def main():
        loop = asyncio.get_running_loop()
        b = TokenBucket(600)  # 10 tokens/s, capacity 10
        await b.acquire(10)
        b.correct(-20)  # the call used 20 more than estimated
        t0 = loop.time()
        await b.acquire(1)
        return loop.time() - t0

    assert 2.0 <= run_virtual(main()) <= 2.2
