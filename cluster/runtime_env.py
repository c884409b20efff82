"""What a submitted job takes to the cluster: a working folder, and API keys sealed for the cluster.

**Working folder.** :func:`build_job` assembles a fresh temporary folder that becomes the job's
Ray ``working_dir``: the effective config (``--set`` overrides and ``-o`` applied) as
``config.yaml``, plus every local file the config names (``input.path``, which may list several
files separated by commas, ``judge.answers_a`` / ``answers_b``, and ``evolve.method`` when it is a
file). Those paths are rewritten to the shipped copies, relative to the working folder, which is
the current directory of the job's driver and of every actor on every node. A path that does not
exist locally (or is a URL) is left as it is: it must exist on the cluster. With ``--working-dir
DIR`` the content of DIR is shipped too (config files inside DIR keep their place).

**API keys.** Ray writes a job's runtime environment, ``env_vars`` included, in clear text to
places we do not control: the runtime-env agent log of every node that starts a worker for the
job (``session_*/logs/runtime_env_agent.log``: "Creating runtime env: {"env_vars": {...}}"), and
the job's record in the GCS, which the dashboard and ``JobSubmissionClient.get_job_info`` show to
anyone who can reach the dashboard. (Found on Ray 2.60 by grepping a session folder after a job
with a plain ``env_vars`` key; ``tests/test_cluster.py`` checks the whole session folder.)

So a key passed with ``--pass-env VAR`` never travels as a plain environment variable. The
submitter seals the passed variables (:func:`seal`) with a key derived from the cluster's Ray
authentication token, which the submitter needs anyway to talk to a token-auth cluster and which
every node already holds. Only the sealed blob is put in ``env_vars`` (as ``EVORAY_SEALED_ENV``);
Ray logs and stores that blob, which is useless without the token. Inside the cluster the
variables are opened into ``os.environ`` of each process that needs them, never onto disk:

* the job driver by ``evoray`` itself (:func:`evoray.cli.main` opens them first thing);
* every worker process of the job (pool actors on all nodes) by the runtime env's
  ``worker_process_setup_hook`` = ``cluster.runtime_env.unseal_environ``.

Whoever holds the Ray token can already run any code on the cluster (and so read any worker's
environment), so binding the key to the token exposes it to nobody new. A cluster without token
authentication has no secret channel at all: ``--pass-env`` then refuses to send the key (set the
key on the nodes instead, e.g. a Kubernetes Secret, see ``cluster/README.md``).

Sealing is Fernet (AES-128-CBC with an HMAC-SHA256 tag, from the ``cryptography`` package) under
a key derived with HKDF-SHA256 from the token and a random 16-byte salt that travels with the blob.

Opening happens inside evoray's own entry point: ``evoray`` (:func:`evoray.cli.main`) opens
``EVORAY_SEALED_ENV`` when it is set before it does anything else, and is a no-op otherwise, so
the job's entrypoint is always plain ``evoray run config.yaml``.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

SEALED_ENV_VAR = "EVORAY_SEALED_ENV"
SETUP_HOOK = "cluster.runtime_env.unseal_environ"
MASK = "***"
_VERSION = b"evoray-seal-v2"
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Ray uploads working_dir through the GCS, which refuses packages above about 500 MiB
MAX_WORKING_DIR_BYTES = 400 * 1024 * 1024
_SKIP_DIRS = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".mypy_cache", "node_modules"}


class SealError(Exception):
    """Sealed variables could not be opened (no token, wrong token, damaged blob). Never holds a key."""


# ---------------------------------------------------------------------------------------------
# The Ray authentication token (the same places Ray's own token loader reads)
# ---------------------------------------------------------------------------------------------

def auth_mode() -> str | None:
    """``RAY_AUTH_MODE`` lower-cased, or None when unset."""
    v = os.environ.get("RAY_AUTH_MODE")
    return v.strip().lower() if v else None


def find_ray_token() -> str | None:
    """The Ray auth token: ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``."""
    tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if tok:
        return tok
    candidates = []
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        candidates.append(Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser())
    candidates.append(Path.home() / ".ray" / "auth_token")
    for p in candidates:
        try:
            tok = p.read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if tok:
            return tok
    return None


def _cluster_token() -> str | None:
    """Inside the cluster: the token this Ray process authenticates with (Ray's loader first)."""
    try:
        from ray._raylet import AuthenticationTokenLoader

        tok = AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True)
        if tok:
            return tok.strip()
    except Exception:
        pass
    return find_ray_token()


# ---------------------------------------------------------------------------------------------
# Sealing
# ---------------------------------------------------------------------------------------------

def _fernet(token: str, salt: bytes):
    from cryptography.fernet import Fernet
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=_VERSION).derive(token.encode("utf-8"))
    return Fernet(base64.urlsafe_b64encode(key))


def seal(values: dict[str, str], token: str) -> str:
    """Encrypt and authenticate ``values`` (name -> value) with a key derived from ``token``."""
    if not token:
        raise SealError("no Ray authentication token to seal with")
    salt = os.urandom(16)
    blob = _fernet(token, salt).encrypt(json.dumps(values, sort_keys=True).encode("utf-8"))
    return "v2." + base64.urlsafe_b64encode(salt).decode("ascii") + "." + blob.decode("ascii")


def unseal(blob: str, token: str) -> dict[str, str]:
    """The values sealed in ``blob``; :class:`SealError` when the token is wrong or the blob damaged."""
    from cryptography.fernet import InvalidToken

    if not token:
        raise SealError("no Ray authentication token on this node to open the passed variables with")
    parts = blob.split(".")
    if len(parts) != 3 or parts[0] != "v2":
        raise SealError("unknown sealed-variable format")
    try:
        salt = base64.urlsafe_b64decode(parts[1].encode("ascii"))
    except Exception:
        raise SealError("damaged sealed variables (not base64)") from None
    if len(salt) != 16:
        raise SealError("damaged sealed variables (bad salt)")
    try:
        plain = _fernet(token, salt).decrypt(parts[2].encode("ascii"))
    except InvalidToken:
        raise SealError("the passed variables were sealed with another Ray token than this node's, or damaged "
                        "(submit with the cluster's token: RAY_AUTH_TOKEN or ~/.ray/auth_token)") from None
    data = json.loads(plain.decode("utf-8"))
    if not isinstance(data, dict):
        raise SealError("damaged sealed variables")
    return {str(k): str(v) for k, v in data.items()}


def unseal_environ() -> list[str]:
    """Open ``EVORAY_SEALED_ENV`` into ``os.environ`` (the worker setup hook); returns the names set.

    Idempotent; a process without the variable is left alone. Raises :class:`SealError` (naming
    no value) when the variables cannot be opened, so the worker fails loudly instead of running
    without its key.
    """
    blob = os.environ.get(SEALED_ENV_VAR)
    if not blob:
        return []
    values = unseal(blob, _cluster_token() or "")
    os.environ.update(values)
    return sorted(values)


# ---------------------------------------------------------------------------------------------
# The job: working folder, runtime env, entrypoint
# ---------------------------------------------------------------------------------------------

@dataclass
class JobSpec:
    """What ``evoray submit`` sends: built by :func:`build_job`, shown by :meth:`describe`."""

    workdir: Path
    runtime_env: dict[str, Any]
    entrypoint: str
    shipped: list[tuple[str, str]] = field(default_factory=list)  # (config key, shipped relative path)
    left_as_is: list[tuple[str, str]] = field(default_factory=list)  # (config key, path) not found locally
    passed_env: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def masked_runtime_env(self) -> dict[str, Any]:
        env = json.loads(json.dumps(self.runtime_env))
        if "env_vars" in env:
            env["env_vars"] = {k: MASK for k in env["env_vars"]}
        return env

    def describe(self) -> str:
        """Human-readable summary of what is shipped. Values of variables are always ``***``."""
        lines = [f"working_dir: {self.workdir} ({_size_str(_tree_size(self.workdir))})"]
        for key, rel in self.shipped:
            lines.append(f"  {key} -> {rel}")
        for key, p in self.left_as_is:
            lines.append(f"  {key}: {p} (not found locally: left as is, must exist on the cluster)")
        if self.passed_env:
            lines.append("env_vars (sealed with the cluster's Ray token, opened only in the job's processes):")
            lines.extend(f"  {name}={MASK}" for name in self.passed_env)
        lines.append("runtime_env: " + json.dumps(self.masked_runtime_env(), sort_keys=True))
        lines.append(f"entrypoint: {self.entrypoint}")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _size_str(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover


def _is_url(p: str) -> bool:
    return "://" in p


def _resolve_local(p: str, config_dir: Path) -> Path | None:
    """A local file named in the config: relative to the current directory (as ``evoray run`` reads
    it), else relative to the config's folder; None when it is not a local file."""
    if not p or _is_url(p):
        return None
    path = Path(p).expanduser()
    for cand in ([path] if path.is_absolute() else [Path.cwd() / path, config_dir / path]):
        if cand.is_file():
            return cand.resolve()
    return None


def _copy_tree(src: Path, dst: Path) -> None:
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(Path(root) / f, dst / rel / f)


def shell_join(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def build_job(config_path: str | Path, overrides: list[str] | None = None, output: str | None = None,
              pass_env: list[str] | None = None, working_dir: str | Path | None = None,
              token: str | None = None, environ: dict | None = None) -> JobSpec:
    """Validate the config locally and assemble the job (see the module docstring).

    Raises :class:`evoray.errors.UsageError` (exit 2) for a bad config, a missing ``--pass-env``
    variable, a passed key without a token to seal it with, or a working folder that is too big.
    """
    from evoray.config import JobConfig, apply_override
    from evoray.errors import ConfigError, UsageError

    environ = os.environ if environ is None else environ
    config_path = Path(config_path)
    JobConfig.from_yaml(config_path, overrides=overrides)  # every config error, named, before anything is built
    data = yaml.safe_load(config_path.read_text(encoding="utf-8")) or {}
    for ov in overrides or []:
        apply_override(data, ov)
    if output:
        data.setdefault("output", {})
        data["output"]["dir"] = output
    cfg = JobConfig.from_dict(data, origin=str(config_path))

    # keys: names checked and present before anything is assembled
    values: dict[str, str] = {}
    for name in pass_env or []:
        if not _ENV_NAME.match(name):
            raise UsageError(f"--pass-env {name!r}: not an environment variable name")
        v = environ.get(name)
        if not v:
            raise UsageError(f"--pass-env {name}: {name} is not set in this environment")
        values[name] = v
    if values and not token:
        raise UsageError(
            "--pass-env needs a Ray cluster with token authentication: without it Ray would write the "
            "key in clear text to its runtime-env logs and job records, readable by anyone who can reach "
            "the dashboard. Enable token auth on the cluster (RAY_AUTH_MODE=token) and make its token "
            "available here (RAY_AUTH_TOKEN or ~/.ray/auth_token), or set the key on the cluster's nodes "
            "(see cluster/README.md)")

    workdir = Path(tempfile.mkdtemp(prefix="evoray-submit-"))
    spec = JobSpec(workdir=workdir, runtime_env={}, entrypoint="")
    try:
        wd_src = Path(working_dir).resolve() if working_dir else None
        if wd_src is not None:
            if not wd_src.is_dir():
                raise UsageError(f"--working-dir {working_dir}: not a folder")
            _copy_tree(wd_src, workdir)
        config_dir = config_path.resolve().parent
        used: set[str] = set()

        def ship(key: str, value: str) -> str:
            src = _resolve_local(value, config_dir)
            if src is None:
                spec.left_as_is.append((key, value))
                return value
            if wd_src is not None and src.is_relative_to(wd_src):
                rel = src.relative_to(wd_src).as_posix()
            else:
                name = src.name
                i = 1
                while f"files/{name}" in used:
                    name = f"{i}_{src.name}"
                    i += 1
                rel = f"files/{name}"
                (workdir / "files").mkdir(exist_ok=True)
                shutil.copy2(src, workdir / rel)
            used.add(rel)
            spec.shipped.append((key, rel))
            return rel

        if cfg.input.path:
            data.setdefault("input", {})
            data["input"]["path"] = ",".join(ship("input.path", p.strip()) for p in cfg.input.path.split(","))
        for key in ("answers_a", "answers_b"):
            v = getattr(cfg.judge, key)
            if v:
                data.setdefault("judge", {})
                data["judge"][key] = ship(f"judge.{key}", v)
        method = cfg.evolve.method
        if method and _resolve_local(method, config_dir) is not None:
            data.setdefault("evolve", {})
            data["evolve"]["method"] = ship("evolve.method", method)
        (workdir / "config.yaml").write_text(
            "# written by evoray submit: the effective config (--set and -o applied, local files shipped)\n"
            + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        try:
            JobConfig.from_yaml(workdir / "config.yaml")
        except ConfigError as e:  # pragma: no cover - rewriting paths cannot break validation
            raise UsageError(f"internal: the rewritten config is invalid: {e}") from None

        size = _tree_size(workdir)
        if size > MAX_WORKING_DIR_BYTES:
            raise UsageError(
                f"the job's working folder would be {_size_str(size)} (Ray's limit is about 500 MiB): put large "
                f"inputs on storage the cluster reads (an absolute path on a shared disk) instead of shipping them")

        # notes that save a surprise on the cluster
        if not Path(cfg.output.dir).is_absolute():
            spec.notes.append(f"output.dir {cfg.output.dir!r} is relative: it lands inside the job's working "
                              f"folder on the head node; pass -o /absolute/path (or a shared disk) to keep it")
        if cfg.cache.enabled and cfg.cache.dir and not Path(cfg.cache.dir).is_absolute():
            spec.notes.append(f"cache.dir {cfg.cache.dir!r} is relative: each job and node gets a fresh cache; "
                              f"use an absolute path on a shared disk for hits across jobs and nodes")
        needed = sorted({p.key_env for p in cfg.providers if p.key_env})
        missing = [n for n in needed if n not in values]
        if missing:
            spec.notes.append(f"the providers read {', '.join(missing)} on the cluster; pass "
                              f"{' '.join('--pass-env ' + n for n in missing)} unless the cluster's nodes set it")

        env_vars = {"PYTHONUNBUFFERED": "1"}
        argv = ["evoray", "run", "config.yaml"]  # evoray opens sealed variables itself (evoray.cli.main)
        if values:
            env_vars[SEALED_ENV_VAR] = seal(values, token or "")
            spec.runtime_env["worker_process_setup_hook"] = SETUP_HOOK
        spec.runtime_env["working_dir"] = str(workdir)
        spec.runtime_env["env_vars"] = env_vars
        spec.entrypoint = shell_join(argv)
        spec.passed_env = sorted(values)
        return spec
    except BaseException:
        spec.cleanup()
        raise
