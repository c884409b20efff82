"""``evoray submit``: run a config on a Ray cluster through Ray's Job Submission API.

::

    evoray submit CONFIG --address http://HEAD:8265 [--follow] [--pass-env OPENAI_API_KEY] [-o /abs/out]
    evoray submit --status JOB_ID | --stop JOB_ID | --logs JOB_ID  [--address ...]

The address comes from ``--address``, else ``RAY_ADDRESS``, else ``RAY_API_SERVER_ADDRESS`` (the
dashboard's HTTP address; ``http://`` is added when missing).

Submitting validates the config locally first (exit 2 on errors, nothing is sent), assembles the
working folder and runtime env (:mod:`cluster.runtime_env`), prints what is shipped (variable
values as ``***``), submits ``evoray run config.yaml`` and prints the job id. ``--follow`` streams
the job's logs and exits 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED.

**Token authentication.** Ray 2.60 clusters use token auth by default: the dashboard answers 401
without ``Authorization: Bearer <token>``. Ray's ``JobSubmissionClient`` adds that header only when
this process runs with ``RAY_AUTH_MODE=token``. We ask the cluster (``GET /api/authentication_mode``,
which needs no token) and, when it says ``token``, pass the header ourselves with the token from
``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token`` (the places Ray's own
loader reads), so ``RAY_AUTH_MODE`` need not be set on the submitting machine. The token is never
printed.

**Keys** passed with ``--pass-env`` are sealed with that token and opened only inside the job's
processes, because Ray logs a job's ``env_vars`` in clear text (see :mod:`cluster.runtime_env`).
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
import urllib.error
import urllib.request

from evoray.errors import UsageError
from evoray.secrets import redact

from .runtime_env import auth_mode, build_job, find_ray_token

TERMINAL_OK = "SUCCEEDED"


def resolve_address(cli_address: str | None) -> str:
    addr = cli_address or os.environ.get("RAY_ADDRESS") or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not addr:
        raise UsageError("no cluster address: pass --address http://HEAD:8265 (the Ray dashboard) or set RAY_ADDRESS")
    addr = addr.strip().rstrip("/")
    if "://" not in addr:
        addr = "http://" + addr
    if addr.startswith("ray://"):
        raise UsageError(f"--address {addr}: evoray submit talks to the Ray dashboard (http://HEAD:8265), not the Ray client port")
    return addr


def cluster_auth_mode(address: str, timeout: float = 10.0) -> str | None:
    """The cluster's auth mode ("token" / "disabled"), or None when the dashboard does not say."""
    try:
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=timeout) as r:
            return str(json.loads(r.read().decode("utf-8")).get("authentication_mode") or "") or None
    except urllib.error.HTTPError:
        return None  # an older Ray without the endpoint
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"cannot reach the Ray dashboard at {address}: {reason} (is the cluster up? the "
                         f"address is the dashboard's, port 8265 by default)") from None


def cluster_token(address: str) -> str | None:
    """The token to send, or None when the cluster does not use token auth."""
    mode = cluster_auth_mode(address)
    if mode == "disabled" or (mode is None and auth_mode() == "disabled"):
        return None
    token = find_ray_token()
    if mode == "token" and not token:
        raise UsageError(f"the cluster at {address} uses token authentication and no token was found here: "
                         f"set RAY_AUTH_TOKEN (print it on the head node with `ray get-auth-token`) or "
                         f"write it to ~/.ray/auth_token")
    return token


def make_client(address: str, token: str | None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as e:  # ConnectionError, auth errors: explain without the headers
        raise UsageError(f"cannot connect to the Ray job server at {address}: {redact(str(e))}") from None


def _say(args, msg: str, err: bool = False) -> None:
    if err or not getattr(args, "quiet", False):
        print(redact(msg), file=sys.stderr if err else sys.stdout, flush=True)


def cmd_submit(args) -> int:
    actions = [a for a in ("status", "stop", "logs") if getattr(args, a, None)]
    if len(actions) > 1:
        raise UsageError("use one of --status, --stop, --logs at a time")
    if actions and args.config:
        raise UsageError(f"--{actions[0]} takes a job id, not a config")
    if not actions and not args.config:
        raise UsageError("evoray submit needs a CONFIG to run (or --status / --stop / --logs JOB_ID)")

    if not actions:
        # the config is checked before any connection: a bad config exits 2 with nothing sent
        from evoray.config import JobConfig

        JobConfig.from_yaml(args.config, overrides=args.overrides)
        address = resolve_address(args.address)
        token = cluster_token(address)
        spec = build_job(args.config, overrides=args.overrides, output=args.output, pass_env=args.pass_env,
                         working_dir=args.working_dir, token=token)
        try:
            return _submit(args, address, token, spec)
        finally:
            spec.cleanup()

    address = resolve_address(args.address)
    client = make_client(address, cluster_token(address))
    job_id = getattr(args, actions[0])
    if actions[0] == "status":
        info = _job_info(client, job_id)
        print(f"{job_id}: {info.status}" + (f" ({redact(info.message)})" if info.message else ""))
        return 0
    if actions[0] == "stop":
        _job_info(client, job_id)
        stopped = client.stop_job(job_id)
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    _job_info(client, job_id)
    sys.stdout.write(redact(client.get_job_logs(job_id)))
    sys.stdout.flush()
    return 0


def _job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        raise UsageError(f"no job {job_id!r} on this cluster ({redact(str(e)).splitlines()[0]})") from None


def new_submission_id() -> str:
    return f"evoray-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _submit(args, address: str, token: str | None, spec) -> int:
    _say(args, f"submitting to {address}")
    for line in spec.describe().splitlines():
        _say(args, line)
    client = make_client(address, token)
    submission_id = new_submission_id()
    try:
        job_id = client.submit_job(entrypoint=spec.entrypoint, runtime_env=spec.runtime_env,
                                   submission_id=submission_id,
                                   metadata={"tool": "evoray", "config": os.path.basename(args.config)})
    except Exception as e:
        raise UsageError(f"the cluster refused the job: {redact(str(e))}") from None
    print(f"job id: {job_id}", flush=True)
    if not args.follow:
        _say(args, f"follow it with: evoray submit --logs {job_id} --address {address}  "
                   f"(status: --status {job_id}, stop: --stop {job_id})")
        return 0
    return follow(client, job_id, quiet=args.quiet)


async def _tail(client, job_id: str, quiet: bool) -> None:
    async for chunk in client.tail_job_logs(job_id):
        if not quiet:
            sys.stdout.write(redact(chunk))
            sys.stdout.flush()


def follow(client, job_id: str, quiet: bool = False, poll_s: float = 1.0) -> int:
    """Stream the job's logs until it ends; 0 when it SUCCEEDED, 1 when it FAILED or was STOPPED."""
    try:
        asyncio.run(_tail(client, job_id, quiet))
        while True:
            info = client.get_job_info(job_id)
            if info.status.is_terminal():
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: evoray submit --stop {job_id}",
              file=sys.stderr)
        return 1
    status = getattr(info.status, "value", str(info.status))
    msg = f"job {job_id}: {status}" + (f" ({redact(info.message)})" if info.message else "")
    print(msg, file=sys.stdout if status == TERMINAL_OK else sys.stderr, flush=True)
    return 0 if status == TERMINAL_OK else 1
