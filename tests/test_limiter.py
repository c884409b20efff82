"""The per-key limiter: strict sliding windows, leases, adaptation, restarts (fake clock, no Ray).

Property-style checks run the scheduler under many random demand patterns (seeded): idle spells,
bursts of demand, 429 pauses, token sizes, and assert the provider's own rule on the grant times.
"""

from __future__ import annotations

import asyncio
import math
import random

import pytest

from evoray.limiter import (KeyGate, LimitSpec, LocalKeyLink, PermitPool, WindowLimiter, gate_actor_name,
                            identity_label, key_identity, spacing_for, window_allowance)
from evoray.testing.clock import StrictWindowModel, max_in_window, run_virtual


def grant_times(lim: WindowLimiter, rng: random.Random, duration: float, est=lambda r: 0,
                pauses: bool = False) -> list[tuple[float, int]]:
    """Ask for permits under a random demand pattern: back-to-back asks, idle spells, 429 pauses."""
    now, out = 0.0, []
    while now < duration:
        r = rng.random()
        if r < 0.05:
            now += rng.uniform(0.0, 3.0)  # an idle spell: no burst may follow it
            continue
        if pauses and r < 0.07 and out:
            lim.pause(now + rng.uniform(0.1, 2.0))  # a 429's Retry-After
        e = est(rng)
        t = lim.peek(now, e)
        lim.commit(t, e)
        out.append((t, e))
        now = t if rng.random() < 0.8 else t + rng.uniform(0.0, 0.2)
    return [(t, e) for t, e in out if t <= duration]


CASES = [(60, 1.0), (600, 1.0), (1170, 1.0), (1200, 1.0), (1800, 0.5), (6000, 1.0), (900, 2.0), (30, 1.0)]


@pytest.mark.parametrize("rpm,window", CASES)
def test_no_window_ever_holds_more_than_the_allowance(rpm, window):
    for seed in range(6):
        lim = WindowLimiter(LimitSpec(rpm=rpm, window_s=window, margin=0.02))
        times = [t for t, _ in grant_times(lim, random.Random(seed), 90.0, pauses=seed % 2 == 1)]
        allowed = window_allowance(rpm, max(window, 60.0 / rpm))
        assert max_in_window(times, window) <= allowed, (rpm, window, seed)
        # and the margin: even arrivals up to margin * window late could not overfill a window
        assert max_in_window(times, window / 0.98 - 1e-9) <= allowed, (rpm, window, seed)
        # the strict provider (rejected requests counted) admits every one of them
        server = StrictWindowModel(rpm, window)
        assert all(server.offer(t) for t in times), (rpm, window, seed)


@pytest.mark.parametrize("rpm", [600, 1200, 3000, 6000])
def test_a_minute_of_steady_demand_uses_at_least_98_percent_of_the_limit(rpm):
    lim = WindowLimiter(LimitSpec(rpm=rpm))
    now, n = 0.0, 0
    while True:
        t = lim.peek(now)
        if t > 60.0:
            break
        lim.commit(t)
        n, now = n + 1, t
    assert n >= 0.98 * rpm
    assert n <= rpm


def test_the_margin_is_on_the_spacing_not_the_count():
    # 1,200 rpm, 1 s window: 20 a second allowed; grants 1/19.6 s apart, not 1/19
    assert spacing_for(20.0, 1.0, 0.02) == pytest.approx(1 / 19.6)
    assert spacing_for(19.5, 1.0, 0.02) == pytest.approx(1 / 19 / 0.98)  # 19 fit in a window, never 20
    assert spacing_for(0.5, 1.0, 0.0) == pytest.approx(2.0)  # 30 rpm: one every two seconds


def test_no_burst_after_a_pause_or_an_idle_spell():
    lim = WindowLimiter(LimitSpec(rpm=600))
    s = lim.spacing()
    times = []
    now = 0.0
    for _ in range(30):
        t = lim.peek(now)
        lim.commit(t)
        times.append(t)
        now = t
    lim.on_429(now, None, 2.0)  # pause for 2 s (and decrease)
    for _ in range(30):
        t = lim.peek(now)
        lim.commit(t)
        times.append(t)
        now = t
    now += 10.0  # idle: the schedule must not "save up" permits
    for _ in range(30):
        t = lim.peek(now)
        lim.commit(t)
        times.append(t)
        now = t
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) >= s - 1e-9
    assert times[30] >= times[29] + 2.0


def test_tokens_charged_at_grant_and_corrected_after():
    spec = LimitSpec(tpm=6000, window_s=1.0, margin=0.0)  # 100 tokens a second
    lim = WindowLimiter(spec)
    now = 0.0
    times = []
    for _ in range(20):
        t = lim.peek(now, 50)
        pid = lim.commit(t, 50)
        times.append(t)
        lim.correct(pid, 10)  # each used 10 of the estimated 50
        now = t
    # with the refunds each request costs 10 tokens once answered; the next is still charged its
    # estimate of 50 at grant, so a window holds 5 answered + 1 new: 20 requests in about 3 s
    assert times[-1] < 4.0
    lim0 = WindowLimiter(spec)  # without the corrections: 2 a second, 20 in about 10 s
    t = 0.0
    for _ in range(20):
        t = lim0.peek(t, 50)
        lim0.commit(t, 50)
    assert t >= 9.0
    # debt: a request that used far more than estimated delays the next one
    lim2 = WindowLimiter(spec)
    pid = lim2.commit(lim2.peek(0.0, 10), 10)
    lim2.correct(pid, 300)
    assert lim2.peek(0.0, 10) >= 1.0  # the window stays full until that grant leaves it


@pytest.mark.parametrize("seed", range(5))
def test_token_window_never_overfilled(seed):
    rng = random.Random(seed)
    spec = LimitSpec(tpm=60_000, window_s=1.0, margin=0.02)  # 1,000 tokens in any window
    lim = WindowLimiter(spec)
    grants = grant_times(lim, rng, 60.0, est=lambda r: r.choice([50, 200, 400, 900]))
    cap = 1000
    ts = sorted(grants)
    for i, (t, _) in enumerate(ts):
        inside = [e for u, e in ts[: i + 1] if u > t - 1.0]
        assert sum(inside) <= cap or len(inside) == 1



def test_steady_token_demand_uses_most_of_the_tpm():
    rng = random.Random(0)
    lim = WindowLimiter(LimitSpec(tpm=60_000))
    t, used = 0.0, 0
    while True:
        e = rng.choice([100, 200, 300])
        t = lim.peek(t, e)
        if t > 60.0:
            break
        lim.commit(t, e)
        used += e
    assert 0.9 * 60_000 <= used <= 60_000


def test_oversized_request_goes_alone():
    lim = WindowLimiter(LimitSpec(tpm=600, window_s=1.0, margin=0.0))  # 10 tokens per window
    t1 = lim.peek(0.0, 5)
    lim.commit(t1, 5)
    t2 = lim.peek(0.0, 50)  # larger than a window: waits for an empty one
    assert t2 >= t1 + 1.0


# ---- key identity -------------------------------------------------------------------------------------


def test_key_identity_holds_a_hash_never_the_key():
    key = "sk-live-SECRET-123456789"
    ident = key_identity("openai", "https://api.openai.com/v1/", key)
    assert key not in ident and "SECRET" not in ident
    assert ident == key_identity("openai", "https://api.openai.com/v1", key)  # trailing slash
    assert ident != key_identity("openai", "https://api.openai.com/v1", key + "x")
    assert ident != key_identity("anthropic", "https://api.openai.com/v1", key)
    assert key not in gate_actor_name(ident) and "SECRET" not in identity_label(ident)
    assert identity_label(ident) == "openai @ https://api.openai.com/v1"


# ---- leases: many clients, one key --------------------------------------------------------------------


def run_clients(gate: KeyGate, specs: list[tuple[str, LimitSpec]], n_per_client: int, concurrency: int = 16,
                latency: float = 0.2, server: StrictWindowModel | None = None, batching: bool = True,
                headers: dict | None = None):
    """Clients (one PermitPool each) that send ``n_per_client`` requests each through the gate."""
    link = LocalKeyLink(gate)
    sent: list[float] = []
    rejected: list[float] = []
    pools: list[PermitPool] = []

    async def request(pool: PermitPool):
        loop = asyncio.get_running_loop()
        while True:
            pid = await pool.take(0)
            t = loop.time()
            if server is None or server.offer(t):
                sent.append(t)
                await asyncio.sleep(latency)
                pool.report(pid, ok=True, limits=headers)
                return
            rejected.append(t)
            pool.report(pid, status=429, retry_after=1.0)
            await asyncio.sleep(1.0)  # the client's retry layer honours Retry-After

    async def client(owner: str, spec: LimitSpec):
        pool = PermitPool(link, owner, spec, batching=batching)
        pools.append(pool)
        sem = asyncio.Semaphore(concurrency)

        async def one():
            async with sem:
                await request(pool)

        await asyncio.gather(*(one() for _ in range(n_per_client)))

    async def main():
        await asyncio.gather(*(client(o, s) for o, s in specs))
        for p in pools:
            p.close()

    run_virtual(main())
    return sent, rejected, pools


def test_four_clients_share_one_key_with_no_429_on_a_strict_server():
    gate = KeyGate("k")
    server = StrictWindowModel(1200)
    spec = LimitSpec(rpm=1200)
    sent, rejected, pools = run_clients(gate, [("job/p", spec)] * 4, 300, server=server)
    assert rejected == [] and len(sent) == 1200
    assert max_in_window(sent, 1.0) <= 20
    rate = (len(sent) - 1) / (max(sent) - min(sent))
    assert rate >= 0.97 * 20
    # leases: most requests found a permit waiting (a lease call carries several)
    calls = sum(p.lease_calls for p in pools)
    assert calls < 0.5 * len(sent), calls
    # shares were fair: every client got about a quarter
    assert all(280 <= p.taken <= 320 for p in pools)


def test_without_batching_every_request_asks_the_gate():
    gate = KeyGate("k")
    sent, rejected, pools = run_clients(gate, [("job/p", LimitSpec(rpm=1200))] * 2, 50, batching=False,
                                        server=StrictWindowModel(1200))
    assert rejected == [] and len(sent) == 100
    assert sum(p.lease_calls for p in pools) == 100


def test_two_jobs_on_one_key_the_lower_limit_wins_and_both_stay_within_it():
    gate = KeyGate("k")
    server = StrictWindowModel(600)
    specs = [("job-a/p", LimitSpec(rpm=1200)), ("job-b/p", LimitSpec(rpm=600))]
    sent, rejected, pools = run_clients(gate, specs, 150, server=server)
    assert rejected == [] and len(sent) == 300
    assert max_in_window(sent, 1.0) <= 10
    assert gate.limiter.rate_rpm() == 600


def test_when_the_stricter_job_leaves_the_other_gets_its_own_limit():
    async def main():
        gate = KeyGate("k")
        gate.register("a/p", LimitSpec(rpm=1200))
        gate.register("b/p", LimitSpec(rpm=600))
        assert gate.limiter.rate_rpm() == 600
        gate.forget("b/p")
        assert gate.limiter.rate_rpm() == 1200
        # a job that stops asking lapses after JOB_TTL_S
        gate.register("b/p", LimitSpec(rpm=300))
        assert gate.limiter.rate_rpm() == 300
        await asyncio.sleep(40)
        gate.register("a/p", LimitSpec(rpm=1200))
        return gate.limiter.rate_rpm()

    assert run_virtual(main()) == 1200


def test_a_dead_client_strands_at_most_its_batch():
    async def main():
        gate = KeyGate("k")
        link = LocalKeyLink(gate)
        spec = LimitSpec(rpm=1200)
        loop = asyncio.get_running_loop()
        # the "dead" client leases once and never uses what it got
        reply = await link.lease("dead", "j/p", spec.to_tuple(), 64, [0] * 64, None, True)
        stranded = len(reply["permits"])
        live = PermitPool(link, "j/p", spec)
        t0 = loop.time()
        for _ in range(200):
            await live.take(0)
        return stranded, loop.time() - t0

    stranded, took = run_virtual(main())
    assert 1 <= stranded <= math.ceil(20 * 0.98 * 2.0)  # its share of the 2 s horizon, at most
    # 200 permits at 19.6/s take ~10.2 s; the stranded ones cost at most their own time
    assert took <= 200 / 19.6 + stranded / 19.6 + 0.5


def test_a_429_revokes_permits_held_by_every_client():
    async def main():
        gate = KeyGate("k")
        link = LocalKeyLink(gate)
        spec = LimitSpec(rpm=600)
        a, b = PermitPool(link, "j/p", spec), PermitPool(link, "j/p", spec)
        loop = asyncio.get_running_loop()
        got: list[float] = []

        async def use(pool):
            pid = await pool.take(0)
            got.append(loop.time())
            return pid

        first = await use(a)
        tasks = [loop.create_task(use(b)) for _ in range(8)]  # b holds permits for the next second
        await asyncio.sleep(0.15)
        a.report(first, status=429, retry_after=3.0)
        t429 = loop.time()
        await asyncio.gather(*tasks)
        return got, t429, gate.epoch, b.dropped

    got, t429, epoch, dropped = run_virtual(main())
    assert epoch == 1 and dropped >= 1
    later = [t for t in got[1:] if t > t429]
    assert later and min(later) >= t429 + 3.0 - 1e-6  # nobody used an old permit after the 429


# ---- adaptation -----------------------------------------------------------------------------------------


def test_a_real_limit_below_the_configured_one_is_learned_from_429s():
    gate = KeyGate("k")
    server = StrictWindowModel(900)  # the key's real limit; the job says 1,200
    sent, rejected, _ = run_clients(gate, [("j/p", LimitSpec(rpm=1200))] * 4, 450, server=server)
    total = len(sent) + len(rejected)
    assert len(rejected) / total < 0.01, len(rejected)
    late = [t for t in sent if t > max(sent) - 60]
    assert len(late) / 60 >= 0.9 * 15  # settled near 900 rpm (15 a second)
    assert len(sent) == 1800


def test_a_limit_header_lowers_the_ceiling_at_once():
    gate = KeyGate("k")
    server = StrictWindowModel(900)
    sent, rejected, _ = run_clients(gate, [("j/p", LimitSpec(rpm=1200))] * 4, 300, server=server,
                                    headers={"limit_requests": 900.0})
    assert len(rejected) <= 3  # only what was granted before the first reply came back
    assert gate.limiter.ceiling_rpm == 900
    late = [t for t in sent if t > max(sent) - 30]
    assert len(late) / 30 >= 0.97 * 15


def test_remaining_zero_pauses_for_one_requests_refill():
    lim = WindowLimiter(LimitSpec(rpm=600))
    # 10 a minute announced, none left, whole again in 30 s: one comes back every 3 s
    lim.observe(10.0, {"limit_requests": 10, "remaining_requests": 0, "reset_requests_s": 30.0})
    assert 13.0 <= lim.peek(10.0) <= 13.1
    lim2 = WindowLimiter(LimitSpec(rpm=600))
    lim2.observe(20.0, {"remaining_requests": 5, "reset_requests_s": 4.0})
    assert lim2.peek(20.0) == 20.0
    # a header can lower the configured limit, never raise it
    lim2.observe(21.0, {"limit_requests": 5000})
    assert lim2.rate_rpm() == 600


def test_remaining_zero_at_full_use_does_not_stall_a_strict_window():
    """At 98 % of a strict window the provider often has nothing left for an instant; its reset
    (when the window is empty again, up to a second) must not pause the key for that long."""
    gate = KeyGate("k")
    headers = {"limit_requests": 1200.0, "remaining_requests": 0.0, "reset_requests_s": 0.95}
    sent, rejected, _ = run_clients(gate, [("j/p", LimitSpec(rpm=1200))] * 4, 150, headers=headers,
                                    server=StrictWindowModel(1200))
    assert rejected == []
    rate = (len(sent) - 1) / (max(sent) - min(sent))
    assert rate >= 0.95 * 19.6


def test_repeated_429s_at_the_same_level_probe_ever_more_slowly():
    lim = WindowLimiter(LimitSpec(rpm=1200))
    server = StrictWindowModel(900)
    now, events = 0.0, []
    while now < 600.0:
        t = lim.peek(now)
        pid = lim.commit(t)
        now = t
        if server.offer(t):
            lim.on_success(now, 1)
        elif lim.on_429(now, pid, 1.0):
            events.append((now, lim.probe, lim.mark))
            assert not lim.on_429(now, pid, 1.0)  # the same permit again is not a new event
    probes = [p for _, p, _ in events]
    assert probes[-1] < probes[1] and probes == sorted(probes, reverse=True)[: len(probes)] or probes[-1] < 0.005
    assert len([t for t, _, _ in events if t > 300]) < len([t for t, _, _ in events if t <= 300])
    assert all(abs(m - 0.75) <= 0.05 for _, _, m in events)  # 900 of 1,200: the limit is read right
    assert server.rejected <= 2 * len(events)


def test_restarted_gate_starts_slow_after_a_quiet_horizon_then_ramps_up():
    async def main():
        gate = KeyGate("k", restarted=True)
        link = LocalKeyLink(gate)
        pool = PermitPool(link, "j/p", LimitSpec(rpm=1200))
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        times = []
        for _ in range(300):
            await pool.take(0)
            times.append(loop.time() - t0)
            pool.report(None, ok=True)
        return times

    times = run_virtual(main())
    assert times[0] >= 2.0  # permits of the dead incarnation may still be in use for one horizon
    first_second = [t for t in times if times[0] <= t < times[0] + 1.0]
    assert len(first_second) <= 13  # about half of 20, ramping up
    late = [t for t in times if t > times[-1] - 3.0]
    assert len(late) / 3.0 >= 0.9 * 19.6  # back to the full rate


def test_cancelled_request_gives_its_permit_back():
    async def main():
        gate = KeyGate("k")
        link = LocalKeyLink(gate)
        pool = PermitPool(link, "j/p", LimitSpec(rpm=60))
        loop = asyncio.get_running_loop()
        await pool.take(0)
        t = loop.create_task(pool.take(0))  # waits ~1 s for its permit
        await asyncio.sleep(0.3)
        t.cancel()
        await asyncio.sleep(0)
        t0 = loop.time()
        await pool.take(0)  # uses the cancelled request's permit, no new lease needed
        return loop.time() - t0, gate.limiter.granted

    waited, granted = run_virtual(main())
    assert waited <= 1.0 and granted == 2
