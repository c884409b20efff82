"""A real two-node Ray cluster on 127.0.0.1, a job submitted to it with ``evoray submit --follow``.

The job is submitted as soon as ``ray start --head`` returns, as a user would, while the worker
node joins: the head's job agent registers a little later, and submit has to wait for it.
The cluster is two ``ray start`` processes (a head and a worker node, 2 CPUs each) with their own
ports and their own ``--temp-dir``, so they never touch another Ray on the machine; the finalizer
kills exactly the processes of that temp dir (never ``ray stop``, which stops every Ray of the
user). Token authentication is on with a token made for this test (``RAY_AUTH_TOKEN``), so
``~/.ray/auth_token`` is neither used nor changed. The test talks to the cluster only through
subprocesses and the Job Submission HTTP API, so it does not care whether the in-process
``ray_session`` of other tests ran before it.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

from conftest import FAKE_KEY, fake_provider

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
ROWS = 200
RPM = 1200  # the fake server's limit and the provider's: 20/s, so 200 rows take about 10 s


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _process_tree(tag: str) -> set[int]:
    """Pids whose command line mentions ``tag`` (our temp dir), and all their descendants."""
    procs: dict[int, tuple[int, str]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        procs[int(d)] = (ppid, cmd)
    found = {p for p, (_, c) in procs.items() if tag in c and p != os.getpid()}
    grew = True
    while grew:
        grew = False
        for p, (pp, _) in procs.items():
            if pp in found and p not in found:
                found.add(p)
                grew = True
    return found


def _kill_tree(tag: str) -> None:
    pids = _process_tree(tag)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in pids:
            try:
                os.kill(p, sig)
            except OSError:
                pass
        deadline = time.monotonic() + 5
        while sig == signal.SIGTERM and time.monotonic() < deadline:
            alive = [p for p in pids if _alive(p)]
            if not alive:
                return
            time.sleep(0.2)
        pids |= _process_tree(tag)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _base_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_") and k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `evoray` and `python` of this venv
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@pytest.fixture
def cluster():
    """A fresh head on 127.0.0.1 with token auth (started, nothing awaited after `ray start` returns);
    ``start_worker()`` adds the second node. Yields the dashboard address, env and temp dir."""
    if shutil.which("ray", path=str(BIN)) is None:
        pytest.skip("the ray CLI is not installed in this environment")
    tmp = Path(tempfile.mkdtemp(prefix="evc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 chars
    token = secrets.token_hex(16)
    env = _base_env()
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    gcs, dash, client, *agent = _free_ports(9)
    common = ["--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--temp-dir", str(tmp), "--disable-usage-stats"]
    head = [str(RAY), "start", "--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(dash), "--ray-client-server-port", str(client),
            "--dashboard-agent-listen-port", str(agent[0]), "--dashboard-agent-grpc-port", str(agent[1]),
            "--metrics-export-port", str(agent[2]), *common]
    worker = [str(RAY), "start", "--address", f"127.0.0.1:{gcs}",
              "--dashboard-agent-listen-port", str(agent[3]), "--dashboard-agent-grpc-port", str(agent[4]),
              "--metrics-export-port", str(agent[5]), *common]

    def start(name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(tmp / f"ray-start-{name}.log", "w")
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def wait(name: str, proc: subprocess.Popen) -> None:
        if proc.wait(timeout=120) != 0:
            pytest.fail(f"ray start ({name}) failed:\n" + (tmp / f"ray-start-{name}.log").read_text()[-3000:])

    t0 = time.monotonic()
    try:
        wait("head", start("head", head))
        print(f"head up in {time.monotonic() - t0:.1f}s", file=sys.stderr)
        yield {"address": f"http://127.0.0.1:{dash}", "token": token, "tmp": tmp, "env": env,
               "start_worker": lambda: start("worker", worker), "wait_worker": lambda p: wait("worker", p)}
    finally:
        _kill_tree(str(tmp))
        shutil.rmtree(tmp, ignore_errors=True)


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


@pytest.mark.cluster
def test_submit_rating_job_to_two_node_cluster(cluster, shared_data, tmp_path):
    from ray.job_submission import JobSubmissionClient

    t0 = time.monotonic()
    out = tmp_path / "out"
    cache = tmp_path / "cache"
    with FakeLLMServer(FakeServerConfig(rpm=RPM, burst_seconds=1.0, latency_s=0.01)) as srv:
        config = {
            # the server's strict window admits 20 in ANY second; a 10 % margin covers the permit-to-arrival
            # lag of two "nodes" sharing two loaded cores (the default 2 %, 20 ms, is checked on the fake clock)
            "providers": [fake_provider(srv, rpm=RPM, limit_margin=0.1)],
            "input": {"path": str(shared_data / "alpagasus/random_9k.json"), "limit": ROWS},
            "output": {"dir": "out/ignored"},  # -o below wins
            # 4 actors x 2 requests in flight could send far more than 20/s: only the job's one gate,
            # shared by the actors of both nodes, keeps them at the server's limit
            "ray": {"rater_actors": 4, "spread": True, "actor_num_cpus": 0.25, "actor_concurrency": 2,
                    "batch_size": 25},
            "cache": {"dir": str(cache)},
            "pipeline": ["rate"],
        }
        cfg_path = tmp_path / "rate.yaml"
        cfg_path.write_text(yaml.safe_dump(config))

        env = _base_env()
        env["OPENAI_API_KEY"] = FAKE_KEY
        env["RAY_AUTH_TOKEN"] = cluster["token"]  # RAY_AUTH_MODE unset: submit asks the cluster
        cmd = [str(BIN / "evoray"), "submit", str(cfg_path), "--address", cluster["address"], "--follow",
               "--pass-env", "OPENAI_API_KEY", "-o", str(out)]
        # `ray start --head` has just returned: submit at once (the head's job agent may not have
        # registered yet; submit waits for it), and add the worker node meanwhile
        sub = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
        cluster["wait_worker"](cluster["start_worker"]())
        try:
            stdout, stderr = sub.communicate(timeout=300)
        finally:
            if sub.poll() is None:
                sub.kill()
        r = subprocess.CompletedProcess(cmd, sub.returncode, stdout, stderr)
        stats = srv.stats()
    printed = r.stdout + r.stderr
    waited = "waiting for the cluster's job agent" in r.stderr
    print(f"submit --follow: exit {r.returncode} after {time.monotonic() - t0:.1f}s (waited for the job agent: "
          f"{waited})\n{printed[-4000:]}", file=sys.stderr)
    assert r.returncode == 0, printed[-5000:]
    assert "the cluster refused the job" not in printed
    assert re.search(r"job \S+: SUCCEEDED, exit code 0", r.stdout), r.stdout[-2000:]
    m = re.search(r"job id: (\S+)", r.stdout)
    assert m, r.stdout
    job_id = m.group(1)
    assert "OPENAI_API_KEY=***" in r.stdout  # what is shipped is printed, the value masked

    # every row lands in exactly one table
    rate = out / "rate"
    n = {t: pq.read_table(rate / f"{t}.parquet").num_rows for t in ("kept", "rejected", "failed")}
    assert sum(n.values()) == ROWS, n
    assert n["failed"] == 0, n
    ids = [i for t in ("kept", "rejected", "failed") for i in pq.read_table(rate / f"{t}.parquet").column("id").to_pylist()]
    assert len(set(ids)) == ROWS
    assert (rate / "_SUCCESS.json").exists() and (out / "ledger.json").exists()

    # the pool actors ran on both nodes
    nodes = json.loads((rate / "_nodes.json").read_text())
    assert len(set(nodes)) == 2, nodes

    # one gate for the key keeps the provider limit across nodes: no 429
    assert stats["rate_limited"] == 0, stats
    assert stats["requests"] >= ROWS

    # the key is in nothing the job or Ray wrote, nor in what the submitter printed
    client = JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})
    info = client.get_job_info(job_id)
    assert info.status == "SUCCEEDED"
    logs = client.get_job_logs(job_id)
    assert "evoray run done in" in logs
    # Ray's own lines stayed out of the job's output: they are in OUT/logs/ray.log
    assert "core_worker.cc" not in logs and "constructor arguments" in (out / "logs" / "ray.log").read_text()
    needle = FAKE_KEY.encode()
    assert FAKE_KEY not in printed
    assert FAKE_KEY not in job_id and FAKE_KEY not in (info.entrypoint or "")
    assert FAKE_KEY not in logs
    assert FAKE_KEY not in json.dumps(info.runtime_env or {})  # the job record in the GCS / dashboard
    assert _files_containing(out, needle) == []
    assert _files_containing(cache, needle) == []
    # Ray's own files: session logs of both nodes (runtime-env agent, dashboard, job manager,
    # raylet, workers), the extracted working dir, the ray start output
    assert _files_containing(cluster["tmp"], needle) == []

    # --status and --logs of the CLI work on the finished job
    st = subprocess.run([str(BIN / "evoray"), "submit", "--status", job_id, "--address", cluster["address"]],
                        env=env, capture_output=True, text=True, timeout=60)
    assert st.returncode == 0 and "SUCCEEDED" in st.stdout, st.stdout + st.stderr
    print(f"two-node submit test: {time.monotonic() - t0:.1f}s", file=sys.stderr)


def test_submit_refuses_bad_config_before_connecting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("providers:\n  - name: x\n    kind: openai\n    rpmm: 5\n")
    env = _base_env()
    r = subprocess.run([str(BIN / "evoray"), "submit", str(bad), "--address", "http://127.0.0.1:9"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "rpmm" in r.stderr


def test_submit_needs_an_address(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("providers:\n  - {name: x, kind: openai}\n")
    r = subprocess.run([str(BIN / "evoray"), "submit", str(cfg)], env=_base_env(), capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--address" in r.stderr


# ---- without a cluster: sealing, the shipped folder, what is printed ---------------------------------

def test_seal_roundtrip_and_wrong_token():
    from cluster.runtime_env import SealError, seal, unseal

    blob = seal({"OPENAI_API_KEY": FAKE_KEY}, "cluster-token")
    assert FAKE_KEY not in blob and "FAKEKEY" not in blob
    assert unseal(blob, "cluster-token") == {"OPENAI_API_KEY": FAKE_KEY}
    assert seal({"OPENAI_API_KEY": FAKE_KEY}, "cluster-token") != blob  # fresh salt each time
    with pytest.raises(SealError) as e:
        unseal(blob, "another-token")
    assert FAKE_KEY not in str(e.value)
    tampered = blob[:-6] + ("A" if blob[-6] != "A" else "B") + blob[-5:]
    with pytest.raises(SealError):
        unseal(tampered, "cluster-token")


def test_unseal_environ_opens_into_this_process(monkeypatch):
    from cluster.runtime_env import SEALED_ENV_VAR, seal, unseal_environ

    monkeypatch.setenv("RAY_AUTH_TOKEN", "tok-123")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv(SEALED_ENV_VAR, seal({"OPENAI_API_KEY": FAKE_KEY}, "tok-123"))
    monkeypatch.setattr("cluster.runtime_env._cluster_token", lambda: os.environ["RAY_AUTH_TOKEN"])
    assert unseal_environ() == ["OPENAI_API_KEY"]
    assert os.environ["OPENAI_API_KEY"] == FAKE_KEY


def test_evoray_entry_point_opens_sealed_variables(monkeypatch, capsys):
    """The job's entrypoint is plain ``evoray run``: evoray opens the sealed variables first thing
    (exit 2, naming no value, when it cannot)."""
    from cluster.runtime_env import SEALED_ENV_VAR, seal
    from evoray.cli import main

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setattr("cluster.runtime_env._cluster_token", lambda: "tok-123")
    monkeypatch.setenv(SEALED_ENV_VAR, seal({"OPENAI_API_KEY": FAKE_KEY}, "another-token"))
    assert main(["config-reference"]) == 2
    err = capsys.readouterr().err
    assert "cannot open the variables passed with --pass-env" in err and FAKE_KEY not in err
    monkeypatch.setenv(SEALED_ENV_VAR, seal({"OPENAI_API_KEY": FAKE_KEY}, "tok-123"))
    assert main(["config-reference"]) == 0
    assert os.environ["OPENAI_API_KEY"] == FAKE_KEY


def test_build_job_ships_named_files_and_masks_keys(tmp_path, monkeypatch):
    from cluster.runtime_env import SEALED_ENV_VAR, build_job, unseal

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data/in.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    (tmp_path / "other").mkdir()
    (tmp_path / "other/in.jsonl").write_text('{"instruction": "z", "output": "w"}\n')
    (tmp_path / "method.txt").write_text("Rewrite #Instruction# to be harder.")
    cfg = tmp_path / "job.yaml"
    cfg.write_text(yaml.safe_dump({
        "providers": [{"name": "main", "kind": "openai"}],
        "input": {"path": "data/in.jsonl,other/in.jsonl"},
        "evolve": {"method": "method.txt"},
        "judge": {"answers_a": "/cluster/only/a.jsonl"},
        "pipeline": ["evolve", "rate"],
    }))
    env = {"OPENAI_API_KEY": FAKE_KEY}
    spec = build_job(cfg, overrides=["rate.threshold=4.0"], output="/abs/out", pass_env=["OPENAI_API_KEY"],
                     token="tok", environ=env)
    try:
        shipped = yaml.safe_load((spec.workdir / "config.yaml").read_text())
        a, b = shipped["input"]["path"].split(",")
        assert (spec.workdir / a).read_text().startswith('{"instruction": "x"')
        assert (spec.workdir / b).read_text().startswith('{"instruction": "z"') and a != b
        assert (spec.workdir / shipped["evolve"]["method"]).is_file()
        assert shipped["judge"]["answers_a"] == "/cluster/only/a.jsonl"  # not local: left for the cluster
        assert shipped["rate"]["threshold"] == 4.0 and shipped["output"]["dir"] == "/abs/out"
        assert spec.entrypoint == "evoray run config.yaml"  # evoray opens the sealed variables itself
        assert spec.runtime_env["worker_process_setup_hook"] == "cluster.runtime_env.unseal_environ"
        assert unseal(spec.runtime_env["env_vars"][SEALED_ENV_VAR], "tok") == env
        text = spec.describe()
        assert "OPENAI_API_KEY=***" in text and FAKE_KEY not in text
        assert spec.runtime_env["env_vars"][SEALED_ENV_VAR] not in text
        assert FAKE_KEY not in "".join(p.read_text() for p in spec.workdir.rglob("*") if p.is_file())
    finally:
        spec.cleanup()
    assert not spec.workdir.exists()


def test_pass_env_refused_without_token_or_value(tmp_path):
    from cluster.runtime_env import build_job
    from evoray.errors import UsageError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("providers:\n  - {name: x, kind: openai}\n")
    with pytest.raises(UsageError, match="token authentication"):
        build_job(cfg, pass_env=["OPENAI_API_KEY"], token=None, environ={"OPENAI_API_KEY": FAKE_KEY})
    with pytest.raises(UsageError, match="not set"):
        build_job(cfg, pass_env=["OPENAI_API_KEY"], token="t", environ={})
    spec = build_job(cfg, token=None, environ={})  # no key asked for: no token needed, plain entrypoint
    try:
        assert spec.entrypoint == "evoray run config.yaml" and "worker_process_setup_hook" not in spec.runtime_env
        assert any("--pass-env OPENAI_API_KEY" in n for n in spec.notes)
    finally:
        spec.cleanup()
