"""Shared pieces of the benchmarks: sizes, the fake server in its own process, Ray, rows, memory, figures.

Benchmarks are scripts, not tests: each ``bN_*.py`` has ``run(session_factory) -> list[Figure]``
and a ``__main__`` that starts its own local Ray (``ray.init`` in this process, ``ray.shutdown``
at the end; never a global ``ray stop``). ``run_all.py`` runs them all under one ``ray.init``.

Environment:

* ``BENCH_QUICK=1``: tiny sizes and one repetition (the smoke test uses it);
* ``BENCH_FULL=1``: the largest sizes (B5's big run), beyond the 20-minute ``make bench`` budget;
* ``BENCH_REPEATS=N``: repetitions per figure (default 3; the figure is their median).

The fake LLM server runs in a separate Python process (:class:`ServerProcess`), so neither the
evoray driver nor the plain reference shares a GIL with it; its counters are read over HTTP.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

FAKE_KEY = "sk-evoray-bench-FAKEKEY-0000"
QUICK = os.environ.get("BENCH_QUICK") == "1"
FULL = os.environ.get("BENCH_FULL") == "1"
REPEATS = int(os.environ.get("BENCH_REPEATS") or (1 if QUICK else 3))


def repeats() -> int:
    return max(1, REPEATS)


def repeats_or(n_full: int) -> int:
    """Repetitions of a long benchmark: ``BENCH_REPEATS`` when set, 1 when quick, else ``n_full``."""
    if os.environ.get("BENCH_REPEATS"):
        return repeats()
    return 1 if QUICK else max(1, n_full)


def size(name: str, full: int, quick: int) -> int:
    """A benchmark size: ``BENCH_<NAME>`` when set, else ``quick`` (BENCH_QUICK=1) or ``full``."""
    v = os.environ.get(f"BENCH_{name.upper()}")
    return int(v) if v else (quick if QUICK else full)


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- figures ----------------------------------------------------------------------------------

@dataclass
class Figure:
    """One reported number: the median of ``runs``, its goal and whether it meets it."""

    bench: str  # "B1" ...
    name: str
    value: float
    unit: str = ""
    goal: str = ""  # human text, e.g. ">= 0.98"
    passed: bool | None = None  # None: no goal (context figure)
    runs: list[float] = field(default_factory=list)
    note: str = ""

    def line(self) -> str:
        verdict = "" if self.passed is None else ("PASS" if self.passed else "MISS")
        runs = ", ".join(_fmt(r) for r in self.runs)
        goal = f"  goal {self.goal}" if self.goal else ""
        return f"FIGURE {self.bench} {self.name}: {_fmt(self.value)}{self.unit and ' ' + self.unit}" \
               f"{goal}  {verdict}  (runs: {runs})".rstrip()

    def to_dict(self) -> dict:
        return asdict(self)


def _fmt(x: float) -> str:
    if x != x:  # nan
        return "n/a"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3f}"


def figure(bench: str, name: str, runs: list[float], unit: str = "", goal: str = "",
           check: Callable[[float], bool] | None = None, note: str = "") -> Figure:
    v = median(runs)
    f = Figure(bench, name, v, unit, goal, (bool(check(v)) if check and v == v else (False if check else None)),
               [float(r) for r in runs], note)
    print(f.line(), flush=True)
    return f


def say(msg: str) -> None:
    print(msg, flush=True)


# ---- machine ----------------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem_gib = int(line.split()[1]) / 2**20
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "mem_gib": round(mem_gib, 1), "cpu": cpu, "python": platform.python_version(),
            "load": os.getloadavg()}


# ---- the fake server in its own process --------------------------------------------------------

class ServerProcess:
    """A :class:`FakeLLMServer` in a child Python process. ``config`` holds FakeServerConfig fields."""

    def __init__(self, **config: Any):
        self.config = config
        self.proc = subprocess.Popen([sys.executable, __file__, "serve", json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
        line = self.proc.stdout.readline().strip()
        if not line.startswith("http"):
            self.proc.kill()
            raise RuntimeError(f"fake server did not start: {line!r}")
        self.url = line
        self.openai_base_url = line + "/v1"
        self.pid = self.proc.pid

    def stats(self) -> dict:
        from evoray.testing.fake_server import fetch_stats

        return fetch_stats(self.url, timeout=30)

    def command(self, cmd: str) -> None:
        """``reset`` (zero the counters and refill the buckets)."""
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def reset(self) -> None:
        self.command("reset")

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _serve(config_json: str) -> None:
    from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

    cfg = json.loads(config_json)
    with FakeLLMServer(FakeServerConfig(**cfg)) as srv:
        print(srv.url, flush=True)
        for line in sys.stdin:  # until the parent closes stdin
            if line.strip() == "reset":
                srv.reset_stats()
                srv.reset_limits()
            print("ok", flush=True)


def admitted_rate(stats: dict, last_s: float | None = None) -> float:
    """Admitted requests per second from the first to the last one (or over the last ``last_s``
    seconds of the run), from the server's own arrival times."""
    ts = sorted(stats.get("admitted_times") or [])
    if last_s is not None and ts:
        ts = [t for t in ts if t >= ts[-1] - last_s]
    if len(ts) < 2 or ts[-1] <= ts[0]:
        return float("nan")
    return (len(ts) - 1) / (ts[-1] - ts[0])


def max_gap(stats: dict) -> float:
    """The longest pause between two arrivals the server saw (seconds)."""
    ts = sorted(stats.get("times") or [])
    return max((b - a for a, b in zip(ts, ts[1:])), default=0.0)


def window_rate(stats: dict, count_key: str = "requests") -> float:
    """Requests per second between the first and the last request the server saw."""
    t0, t1 = stats.get("first_request_t"), stats.get("last_request_t")
    n = stats.get(count_key, 0)
    if not t0 or not t1 or t1 <= t0 or n < 2:
        return float("nan")
    return (n - 1) / (t1 - t0)


# ---- Ray ----------------------------------------------------------------------------------------

#: object store of the benchmarks' Ray (``ray.object_store_mb`` of a job's own Ray does the same).
#: Every process that reads blocks maps the store's pages, and they stay in its RSS after the
#: block is freed; with Ray's default store (30 % of RAM, about 7 GiB here) the driver's RSS crept
#: up by about 100 MiB of such shared pages over a 1,000,000-row run while its private memory
#: stayed flat. A stage holds at most ``ray.read_ahead_mb`` of blocks ahead of its pool (sized to the pool: 16 MiB in B5).
OBJECT_STORE_MB = int(os.environ.get("BENCH_OBJECT_STORE_MB") or 512)


def init_ray(num_cpus: int = 4) -> None:
    """This process's own local Ray (4 logical CPUs, like the test session: pool actors ask 0.25)."""
    os.environ["OPENAI_API_KEY"] = FAKE_KEY  # workers inherit the env of the process that starts Ray
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=num_cpus, include_dashboard=False, namespace="evoray-bench", configure_logging=False,
                 log_to_driver=False, object_store_memory=OBJECT_STORE_MB * 2**20)
    from actors.session import _quiet_ray_data

    _quiet_ray_data()


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def main_with_ray(run) -> None:
    """A benchmark script run on its own: ``run()`` under a local Ray started and stopped here."""
    init_ray()
    try:
        run()
    finally:
        shutdown_ray()


def provider(base_url: str, name: str = "fake", **kw: Any) -> dict:
    d = {"name": name, "kind": "openai", "model": "fake-model", "base_url": base_url, "max_attempts": 6,
         "backoff_base_s": 0.05, "backoff_max_s": 1.0, "timeout_s": 30}
    d.update(kw)
    return d


def job_config(providers: list[dict], outdir: Path, **ray_kw: Any):
    from evoray.config import JobConfig

    return JobConfig.from_dict({
        "providers": providers,
        "output": {"dir": str(outdir)},
        "ray": {"rater_actors": 4, "batch_size": 64, **ray_kw},
        "cache": {"enabled": False},  # every request must reach the server
        "rate": {"random_baseline": False, "parse_retries": 0},
    })


# ---- rows ---------------------------------------------------------------------------------------

def synthetic_rows(n: int, path: Path) -> Path:
    """A canonical Parquet file of ``n`` distinct instruction rows (written in chunks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from evoray.schema import ROW_SCHEMA

    if path.exists() and pq.ParquetFile(path).metadata.num_rows == n:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    chunk = 50_000
    with pq.ParquetWriter(tmp, ROW_SCHEMA) as w:
        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            ids = [f"syn-{i:08d}" for i in range(start, start + k)]
            cols = {
                "id": ids,
                "instruction": [f"Explain step {i} of making bread, and why it matters for the crumb." for i in
                                range(start, start + k)],
                "input": [""] * k,
                "output": [f"Step {i}: knead the dough for ten minutes so the gluten develops; this gives an even, "
                           f"open crumb." for i in range(start, start + k)],
                "source": ["synthetic"] * k,
                "meta": [None] * k,
                "parent_id": [None] * k,
                "round": [None] * k,
                "method_id": [None] * k,
            }
            w.write_table(pa.Table.from_pydict(cols, schema=ROW_SCHEMA), row_group_size=4096)
    os.replace(tmp, path)
    return path


def work_dir() -> Path:
    d = Path(os.environ.get("BENCH_WORK") or (ROOT / "out" / "bench"))
    d.mkdir(parents=True, exist_ok=True)
    return d


# ---- running evoray and the reference ---------------------------------------------------------------

def rate_once(providers: list[dict], rows: Path, outdir: Path, during: Callable[[Any], Any] | None = None,
              **ray_kw: Any) -> dict[str, Any]:
    """One ``stage_rate`` through a fresh JobContext (its own job gate; the key gates are shared) on
    the running Ray: wall time, counts, ledger and the key gates' status before and after.
    ``during(session)``, when given, runs in a thread while the stage runs (e.g. kills a gate)."""
    import shutil

    from evoray.jobs import JobContext
    from evoray.stages import stage_rate

    shutil.rmtree(outdir, ignore_errors=True)
    ctx = JobContext(job_config(providers, outdir, **ray_kw), quiet=True)
    try:
        session = ctx.session()  # the gate actors start outside the timed part
        before = session.key_gate_status()
        thread = threading.Thread(target=during, args=(session,), daemon=True) if during else None
        t0 = time.perf_counter()
        if thread:
            thread.start()
        res = stage_rate(ctx, str(rows), outdir)
        wall = time.perf_counter() - t0
        if thread:
            thread.join(60)
        ledger = ctx.ledger_dict()
        after = session.key_gate_status()
    finally:
        ctx.close()
    return {"wall_s": wall, "counts": res.counts, "ledger": ledger, "gates_before": before, "gates_after": after}


def gate_cpu_per_request(r: dict, provider: str = "fake") -> float:
    """Key-gate CPU seconds per permit granted during one ``rate_once`` (0 when it has no gate)."""
    a, b = r["gates_after"].get(provider), r["gates_before"].get(provider)
    if not a or not b:
        return float("nan")
    if a.get("pid") != b.get("pid"):  # restarted meanwhile: only the new process's CPU is known
        return a["cpu_s"] / max(1, a["permits"])
    return (a["cpu_s"] - b["cpu_s"]) / max(1, a["permits"] - b["permits"])


def run_reference(base_url: str, n: int, rpm: float | None = None, concurrency: int = 64,
                  period: float = 60.0) -> dict[str, Any]:
    """bench/plain_reference.py in its own process (its own GIL, like a user's script)."""
    return run_peers(base_url, n, rpm, 1, concurrency=concurrency, period=period)


def run_peers(base_url: str, n: int, rpm: float | None, procs: int, concurrency: int = 64,
              period: float = 1.0) -> dict[str, Any]:
    """``procs`` plain-reference processes at once, each with ``n/procs`` prompts and an
    ``AsyncLimiter`` for ``rpm/procs`` (what a careful user does without a shared gate)."""
    share = [n // procs + (1 if i < n % procs else 0) for i in range(procs)]
    env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY}
    t0 = time.perf_counter()
    ps = [subprocess.Popen([sys.executable, str(ROOT / "bench" / "plain_reference.py"), base_url, str(k),
                            str(rpm / procs) if rpm else "none", str(concurrency), str(period), str(sum(share[:i]))],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
          for i, k in enumerate(share)]
    outs = []
    for p in ps:
        out, err = p.communicate(timeout=1800)
        if p.returncode != 0:
            raise RuntimeError(f"plain_reference failed: {err[-2000:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    wall = time.perf_counter() - t0
    return {"n": n, "failed": sum(o["failed"] for o in outs), "wall_s": wall, "req_per_s": n / wall}


# ---- memory: /proc, no psutil needed -------------------------------------------------------------

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS", "VmHWM", "RssAnon", "RssShmem")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0]) * 1024
    except (OSError, ValueError):
        pass
    return out


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


class MemorySampler:
    """Peak RSS of this process (the driver) and of each Ray worker process of this process's Ray.

    Resets the kernel's peak counters (``/proc/PID/clear_refs`` = 5) at start, samples ``VmRSS``
    every ``every_s`` seconds in a thread, and at stop takes the max of the samples and ``VmHWM``.
    ``exclude`` pids (the fake server) and their children are left out.
    """

    def __init__(self, exclude: list[int] | None = None, every_s: float = 0.2):
        self.exclude = set(exclude or [])
        self.every_s = every_s
        self.peaks: dict[int, int] = {}
        self.anon: dict[int, int] = {}   # sampled peak of private memory (RssAnon)
        self.shmem: dict[int, int] = {}  # sampled peak of shared-memory pages (RssShmem: Ray's object store)
        self.own: dict[int, int] = {}  # sampled peak of VmRSS - RssShmem: the process's own pages (private + file)
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _pids(self) -> list[int]:
        me = os.getpid()
        kids = _children_map()
        out, todo = [me], [me]
        while todo:
            p = todo.pop()
            for c in kids.get(p, []):
                if c in self.exclude:
                    continue
                out.append(c)
                todo.append(c)
        return out

    def _sample(self) -> None:
        for pid in self._pids():
            st = _status(pid)
            rss = max(st.get("VmRSS", 0), st.get("VmHWM", 0))
            if rss > self.peaks.get(pid, 0):
                self.peaks[pid] = rss
            for d, k in ((self.anon, "RssAnon"), (self.shmem, "RssShmem")):
                if st.get(k, 0) > d.get(pid, 0):
                    d[pid] = st[k]
            own = st.get("VmRSS", 0) - st.get("RssShmem", 0)
            if own > self.own.get(pid, 0):
                self.own[pid] = own
            if pid == os.getpid():
                self.names[pid] = "driver"
            elif pid not in self.names or not self.names[pid].startswith("ray::") or "IDLE" in self.names[pid]:
                self.names[pid] = (cmdline(pid) or comm(pid) or "?")[:60]

    def start(self) -> "MemorySampler":
        for pid in self._pids():
            try:
                with open(f"/proc/{pid}/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._sample()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join()
        self._sample()
        driver = self.peaks.get(os.getpid(), 0)
        workers = {pid: (self.names.get(pid, "?"), rss) for pid, rss in self.peaks.items()
                   if pid != os.getpid() and self.names.get(pid, "").startswith("ray::")}
        other = {pid: (self.names.get(pid, "?"), rss) for pid, rss in self.peaks.items()
                 if pid != os.getpid() and pid not in workers}
        me = os.getpid()
        return {"driver": driver, "workers": workers, "other": other,
                "driver_anon": self.anon.get(me, 0), "driver_shmem": self.shmem.get(me, 0),
                "driver_own": self.own.get(me, 0),
                "workers_own": {pid: self.own.get(pid, 0) for pid in workers},
                "workers_anon": {pid: self.anon.get(pid, 0) for pid in workers},
                "workers_shmem": {pid: self.shmem.get(pid, 0) for pid in workers}}


if __name__ == "__main__" and len(sys.argv) >= 3 and sys.argv[1] == "serve":
    _serve(sys.argv[2])
