"""The gate as clients see it: shared limits, concurrency, 429 pauses, failover, budget (fake clock).

Each "actor" is its own :class:`ClientGate` (own permit pool) on one :class:`Gatekeeper`, as pool
actors are in a Ray job; the per-key rate lives in the Gatekeeper's in-process key gates.
"""

import asyncio

import pytest

from evoray.config import ProviderConfig
from evoray.errors import BudgetExceeded
from evoray.gate import Gatekeeper, LocalGate, provider_identity
from evoray.testing.clock import StrictWindowModel, TokenBucketModel, max_in_window, run_virtual


def cfg(name="p", url=None, **kw):
    # a base URL per entry: entries on one key (same kind, URL and key) would share one limit
    return ProviderConfig(name=name, kind="openai", model="m", base_url=url or f"http://{name}.test/v1", **kw)


def test_four_actors_share_one_rpm_and_never_exceed_the_provider_window():
    keeper = Gatekeeper([cfg(rpm=600)])
    gates = [LocalGate(keeper) for _ in range(4)]
    times = []

    async def actor(gate, n):
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(8)

        async def one():
            async with sem:
                g = await gate.acquire(["p"], 0)
                times.append(loop.time())
                await asyncio.sleep(0.2)
                await gate.release(g, "p", ok=True)

        await asyncio.gather(*(one() for _ in range(n)))

    async def main():
        await asyncio.gather(*(actor(g, 300) for g in gates))
        for g in gates:
            g.close()

    run_virtual(main())
    assert len(times) == 1200
    assert max_in_window(times, 1.0) <= 10  # "about 10 requests in any one second"
    server = StrictWindowModel(600)
    assert all(server.offer(t) for t in sorted(times))
    bucket = TokenBucketModel(600, burst_seconds=1.0)  # the lenient kind of provider agrees too
    for t in sorted(times):
        bucket.offer(t)
    assert bucket.rejected == 0
    # and the whole limit is used: 1200 requests at 9.8/s take about 122 s
    span = max(times) - min(times)
    assert 118.0 <= span <= 124.0


def test_entries_on_one_key_share_one_limit(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-same-key-000000")
    a = cfg("a", url="http://one.test/v1", rpm=600)
    b = cfg("b", url="http://one.test/v1", rpm=600)
    assert provider_identity(a) == provider_identity(b)
    keeper = Gatekeeper([a, b])
    gate = LocalGate(keeper)
    times = []

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(100):
            g = await gate.acquire(["a", "b"], 0)
            times.append(loop.time())
            await gate.release(g, g.provider, ok=True)
        gate.close()

    run_virtual(main())
    assert max_in_window(times, 1.0) <= 10  # one key: 600 rpm in all, not 600 per entry


def test_tpm_estimate_then_correction_refunds_unused_tokens():
    keeper = Gatekeeper([cfg(tpm=6000)])  # 100 tokens a second
    gate = LocalGate(keeper)
    times = []

    async def main():
        loop = asyncio.get_running_loop()
        for _ in range(20):
            g = await gate.acquire(["p"], 50)
            times.append(loop.time())
            await gate.release(g, "p", ok=True, used_tokens=10)  # 40 tokens back each time
            await asyncio.sleep(0.01)
        gate.close()

    run_virtual(main())
    # charged 50 at grant, 10 after: ~6 a second instead of 2 without the refunds (10 s)
    assert max(times) < 5.0


def test_max_concurrency_is_enforced_across_callers():
    keeper = Gatekeeper([cfg(max_concurrency=3)])
    gates = [LocalGate(keeper) for _ in range(3)]
    inflight = 0
    peak = 0

    async def call(gate):
        nonlocal inflight, peak
        g = await gate.acquire(["p"], 0)
        inflight += 1
        peak = max(peak, inflight)
        await asyncio.sleep(1.0)
        inflight -= 1
        await gate.release(g, "p", ok=True)

    async def main():
        await asyncio.gather(*(call(gates[i % 3]) for i in range(12)))

    run_virtual(main())
    assert peak == 3


def test_a_429_pauses_every_caller_for_the_advised_time():
    keeper = Gatekeeper([cfg(rpm=6000)])
    gates = [LocalGate(keeper) for _ in range(3)]
    grants = []

    async def main():
        loop = asyncio.get_running_loop()
        g = await gates[0].acquire(["p"], 0)
        await gates[0].release(g, "p", ok=False, status=429, retry_after=7.0)
        t0 = loop.time()

        async def one(gate):
            await gate.acquire(["p"], 0)
            grants.append(loop.time() - t0)

        await asyncio.gather(*(one(gates[i % 3]) for i in range(9)))
        for gt in gates:
            gt.close()

    run_virtual(main())
    assert len(grants) == 9 and all(g >= 7.0 for g in grants)


def test_failing_provider_cools_down_and_share_moves_to_the_other():
    keeper = Gatekeeper([cfg("bad", failures_before_cooldown=2, cooldown_s=60), cfg("good")])
    gate = LocalGate(keeper)
    picked = []

    async def main():
        for _ in range(20):
            g = await gate.acquire(["bad", "good"], 0)
            picked.append(g.provider)
            await gate.release(g, g.provider, ok=g.provider == "good", health_failure=g.provider == "bad")

    run_virtual(main())
    assert picked.count("bad") == 2  # two failures in a row, then out for the cool-down
    assert picked[-10:] == ["good"] * 10
    assert keeper.status()["bad"]["cooldowns"] == 1


def test_a_cool_down_reaches_other_processes_with_their_next_ledger_flush():
    keeper = Gatekeeper([cfg("bad", failures_before_cooldown=1, cooldown_s=60), cfg("good")])
    first, second = LocalGate(keeper), LocalGate(keeper)

    async def main():
        g = await first.acquire(["bad"], 0)
        await first.release(g, "bad", ok=False, health_failure=True)  # first cools "bad" down
        before = second.cooling_until.get("bad", 0.0)
        await second.record({})  # the periodic ledger flush brings the job's cool-downs
        return before, second.cooling_until.get("bad", 0.0) - asyncio.get_running_loop().time()

    before, left = run_virtual(main())
    assert before == 0.0 and 59.0 <= left <= 60.0


def test_spreading_follows_weights_when_both_have_headroom():
    keeper = Gatekeeper([cfg("a", weight=3), cfg("b", weight=1)])
    gate = LocalGate(keeper)
    picked = []

    async def main():
        for _ in range(400):
            g = await gate.acquire(["a", "b"], 0)
            picked.append(g.provider)
            await gate.release(g, g.provider, ok=True)

    run_virtual(main())
    assert picked.count("a") == 300 and picked.count("b") == 100


def test_two_limited_providers_give_twice_the_rate():
    keeper = Gatekeeper([cfg("a", rpm=600), cfg("b", rpm=600)])
    gates = [LocalGate(keeper) for _ in range(4)]
    times = []

    async def worker(gate):
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(8)

        async def one():
            async with sem:
                g = await gate.acquire(["a", "b"], 0)
                times.append((loop.time(), g.provider))
                await asyncio.sleep(0.1)
                await gate.release(g, g.provider, ok=True)

        await asyncio.gather(*(one() for _ in range(200)))

    async def main():
        await asyncio.gather(*(worker(g) for g in gates))
        for g in gates:
            g.close()

    run_virtual(main())
    assert len(times) == 800
    span = max(t for t, _ in times)
    # 800 requests over two 10/s providers: about 41 s, where one provider alone would need 82 s
    assert span <= 46.0
    for name in ("a", "b"):
        mine = [t for t, n in times if n == name]
        assert max_in_window(mine, 1.0) <= 10


def test_an_unequal_pair_is_used_by_headroom_not_only_by_weight():
    keeper = Gatekeeper([cfg("big", rpm=1200), cfg("small", rpm=300)])
    gate = LocalGate(keeper)
    picked = []

    async def main():
        sem = asyncio.Semaphore(32)

        async def one():
            async with sem:
                g = await gate.acquire(["big", "small"], 0)
                picked.append(g.provider)
                await asyncio.sleep(0.2)
                await gate.release(g, g.provider, ok=True)

        await asyncio.gather(*(one() for _ in range(750)))
        gate.close()

    run_virtual(main())
    # equal weights, but the big one has four times the headroom: it serves most requests
    assert picked.count("big") >= 2.5 * picked.count("small")


def test_budget_stops_new_permits():
    keeper = Gatekeeper([cfg(price={"input_per_mtok": 1e6, "output_per_mtok": 0})], budget_usd=1.0)
    keeper.record({"p": {"requests": 1, "succeeded": 1, "input_tokens": 2, "dollars": 2.0, "model": "m"}})
    gate = LocalGate(keeper)

    async def main():
        await gate.acquire(["p"], 0)

    with pytest.raises(BudgetExceeded):
        run_virtual(main())


def test_dead_holder_slot_is_reclaimed_after_its_lease():
    keeper = Gatekeeper([cfg(max_concurrency=1)], lease_s=5.0)
    dead, alive = LocalGate(keeper), LocalGate(keeper)

    async def main():
        loop = asyncio.get_running_loop()
        await dead.acquire(["p"], 0)  # never released: its holder "died"
        t0 = loop.time()
        await alive.acquire(["p"], 0)
        return loop.time() - t0

    waited = run_virtual(main())
    assert 5.0 <= waited <= 7.0


def test_rate_limit_headers_reach_the_key_gate():
    keeper = Gatekeeper([cfg(rpm=1200)])
    gate = LocalGate(keeper)

    async def main():
        g = await gate.acquire(["p"], 0)
        await gate.release(g, "p", ok=True, limits={"limit_requests": 300.0})
        g = await gate.acquire(["p"], 0)  # the report rides along with this lease
        await gate.release(g, "p", ok=True)
        gate.close()
        return keeper.key_status()

    st = run_virtual(main())
    (only,) = st.values()
    assert only["ceiling_rpm"] == 300.0 and only["header_rpm"] == 300.0
