"""End to end: a distinctive key in OPENAI_API_KEY appears in no output, cache, report, ledger,
captured output or Ray session log.

One ``evoray run`` in a subprocess with its own local Ray (``RAY_TMPDIR`` in a fresh folder, so its
session logs are ours alone) runs two stages against two fake servers: ``rate`` against a server
that accepts the key, and ``answer`` against one that requires another key, so every answer
request draws a 401 and the rows fail (the failing run). Then ``evoray report`` and ``evoray
estimate``, and a job that fails before it starts (exit 2). Every byte written anywhere is searched
for the key and for its distinctive fragment. (The cluster-submission variant is in
tests/test_cluster.py.)
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from evoray.io import write_table
from evoray.schema import new_row
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig

FRAGMENT = "E2ESECRET" + secrets.token_hex(6).upper()
KEY = f"sk-evoray-{FRAGMENT}-{secrets.token_hex(8)}"
EXE = Path(sys.executable).with_name("evoray")

pytestmark = pytest.mark.ray


def _provider(name: str, srv: FakeLLMServer) -> dict:
    return {"name": name, "kind": "openai", "model": "fake-model", "base_url": srv.openai_base_url,
            "max_attempts": 2, "backoff_base_s": 0.05, "backoff_max_s": 0.2, "timeout_s": 20,
            "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}


def _leaks(root: Path) -> list[str]:
    """Files under ``root`` holding the key or its fragment (regular files only; sockets skipped)."""
    hits = []
    needles = [KEY.encode(), FRAGMENT.encode()]
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            try:
                if not p.is_file() or p.is_symlink():
                    continue
                data = p.read_bytes()
            except OSError:
                continue
            if any(n in data for n in needles):
                hits.append(str(p))
    return hits


def test_key_in_no_output_cache_report_or_ray_log(tmp_path):
    rows = [new_row(f"Give tip {i} for writing clear emails.", "", f"Tip {i}: keep it short.", source="s")
            for i in range(24)]
    write_table(rows, tmp_path / "rows.jsonl")
    ray_tmp = Path(tempfile.mkdtemp(prefix="evs-", dir="/tmp"))  # the child's own Ray: short socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(OPENAI_API_KEY=KEY, RAY_TMPDIR=str(ray_tmp), PYTHONUNBUFFERED="1")
    env.pop("ANTHROPIC_API_KEY", None)
    captured: list[str] = []

    def run(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        r = subprocess.run([str(EXE), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
        captured.extend([r.stdout, r.stderr])
        return r

    try:
        with FakeLLMServer(FakeServerConfig(required_key=KEY)) as good, \
                FakeLLMServer(FakeServerConfig(required_key="sk-some-other-key-000000")) as bad:
            cfg = tmp_path / "job.yaml"
            cfg.write_text(json.dumps({
                "providers": [_provider("good", good), _provider("bad", bad)],
                "roles": {"rater": ["good"], "answer": ["bad"]},
                "input": {"path": str(tmp_path / "rows.jsonl")},
                "output": {"dir": str(tmp_path / "out")},
                "cache": {"dir": str(tmp_path / "cache")},
                "ray": {"num_cpus": 2, "rater_actors": 1, "evolver_actors": 1, "batch_size": 8},
                "pipeline": ["rate", "answer"],
            }))
            r = run("run", str(cfg))
            assert r.returncode in (0, 1), r.stdout[-2000:] + r.stderr[-2000:]
            assert good.stats()["ok"] >= 24
            assert bad.stats()["unauthorized"] > 0 and bad.stats()["ok"] == 0
        out = tmp_path / "out"
        if r.returncode == 0:
            failed = pq.read_table(out / "answer" / "failed.parquet").to_pylist()
            assert failed and all("401" in (f["reason"] or "") for f in failed)
        assert run("report", str(out / "rate")).returncode == 0
        assert (out / "rate" / "report.html").exists()
        assert run("estimate", str(cfg)).returncode == 0
        # a job that stops before it starts: a config error, and a missing input
        assert run("rate", str(cfg), "--set", "ray.rater_actors=-1").returncode == 2
        assert run("rate", str(cfg), "-i", str(tmp_path / "absent.jsonl"), "-o", str(tmp_path / "o2")).returncode == 2

        logs = list(ray_tmp.rglob("*.log")) + list(ray_tmp.rglob("*.out")) + list(ray_tmp.rglob("*.err"))
        assert logs, "the child's Ray session logs are there to search"
        assert _leaks(ray_tmp) == []
        assert _leaks(tmp_path) == []
        assert all(KEY not in c and FRAGMENT not in c for c in captured)
        assert (out / "ledger.json").exists() and (out / "rate" / "ledger.json").exists()
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
