"""``evoray submit``: run a config on a Ray cluster through Ray's Job Submission API.

::

    evoray submit CONFIG --address http://HEAD:8265 [--follow] [--pass-env OPENAI_API_KEY] [-o /abs/out]
    evoray submit --status JOB_ID | --stop JOB_ID | --logs JOB_ID  [--address ...]

The address comes from ``--address``, else ``RAY_ADDRESS``, else ``RAY_API_SERVER_ADDRESS`` (the
dashboard's HTTP address; ``http://`` is added when missing).

Submitting validates the config locally first (exit 2 on errors, nothing is sent), assembles the
working folder and runtime env (:mod:`cluster.runtime_env`), prints what is shipped (variable
values as ``***``), submits ``evoray run config.yaml`` and prints the job id. ``--follow`` streams
the job's logs, then prints the job's final status and its driver's exit code, and exits 0 when the
job SUCCEEDED, else the job's exit code (evoray's own: 1 failed, 2 bad config, 3 budget), or 1.

**A cluster that is still starting.** ``ray start --head`` returns before the head's job agent has
registered; until then the Jobs API answers 500 "No available agent to submit job". Submitting
waits for it with one line ("waiting for the cluster's job agent ...") and retries, and retries
other transient dashboard failures (connection refused or reset, 502/503/504) the same way, all
within ``--timeout`` seconds (default 300); a retried submission reuses its submission id, so it
never starts the job twice. ``--follow`` reconnects a dropped log stream (printing only what it had
not printed) until the job ends.

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
import re
import secrets
import sys
import time
import urllib.error
import urllib.request
from typing import Any, Callable

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


NO_AGENT = "No available agent"
#: how long refused connections are retried (at most --timeout)
CONNECT_PATIENCE_S = 30.0


def transient(e: BaseException) -> str | None:
    """Why a dashboard call is worth retrying ("job agent" when the head's job agent has not
    registered yet, else a short cause), or None when it is not transient."""
    msg = str(e)
    if NO_AGENT in msg:
        return "job agent"
    m = re.search(r"status code (\d{3})", msg)
    if m and int(m.group(1)) in (502, 503, 504):
        return f"HTTP {m.group(1)}"
    if isinstance(e, (ConnectionError, TimeoutError, urllib.error.URLError)):
        return f"cannot connect ({type(e).__name__})"
    try:
        import requests

        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            return f"cannot connect ({type(e).__name__})"
    except ImportError:  # pragma: no cover
        pass
    return None


class Patience:
    """Retries transient dashboard failures until ``timeout_s`` has passed since the first one,
    saying once per cause what it waits for; the clock and sleep are injectable for tests."""

    def __init__(self, address: str, timeout_s: float, say: Callable[[str], None],
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        self.address = address
        self.timeout_s = timeout_s
        self.say = say
        self.clock = clock
        self.sleep = sleep
        self.said: set[str] = set()
        self.retries = 0

    def call(self, fn: Callable[[], Any], what: str) -> Any:
        start = None
        delay = 0.5
        while True:
            try:
                return fn()
            except Exception as e:
                cause = transient(e)
                if cause is None:
                    raise
                now = self.clock()
                start = now if start is None else start
                # a dashboard that refuses connections is more often a wrong address than a slow
                # start (`ray start --head` returns once the dashboard listens): shorter patience
                limit = self.timeout_s if cause == "job agent" or cause.startswith("HTTP") else \
                    min(self.timeout_s, CONNECT_PATIENCE_S)
                if now - start >= limit:
                    raise UsageError(
                        f"{what}: the cluster at {self.address} did not become ready within {limit:g} s "
                        f"({'its job agent never registered' if cause == 'job agent' else cause}: "
                        f"{redact(str(e)).splitlines()[0][:200]}); check the head node's dashboard_agent.log, "
                        f"or wait longer with --timeout") from None
                if cause not in self.said:
                    self.said.add(cause)
                    if cause == "job agent":
                        self.say(f"waiting for the cluster's job agent (the head starts it after `ray start` "
                                 f"returns; up to {self.timeout_s:g} s, --timeout) ...")
                    else:
                        self.say(f"the dashboard at {self.address} is not answering ({cause}); retrying for up to "
                                 f"{limit:g} s ...")
                self.retries += 1
                self.sleep(delay)
                delay = min(delay * 2, 5.0)


def cluster_auth_mode(address: str, timeout: float = 10.0) -> str | None:
    """The cluster's auth mode ("token" / "disabled"), or None when the dashboard does not say."""
    try:
        with urllib.request.urlopen(f"{address}/api/authentication_mode", timeout=timeout) as r:
            return str(json.loads(r.read().decode("utf-8")).get("authentication_mode") or "") or None
    except urllib.error.HTTPError as e:
        if e.code in (502, 503, 504):
            raise ConnectionError(f"status code {e.code}") from None
        return None  # an older Ray without the endpoint


def cluster_token(address: str, patience: Patience | None = None) -> str | None:
    """The token to send, or None when the cluster does not use token auth."""
    try:
        mode = patience.call(lambda: cluster_auth_mode(address), "contacting the dashboard") if patience \
            else cluster_auth_mode(address)
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise UsageError(f"cannot reach the Ray dashboard at {address}: {reason} (is the cluster up? the "
                         f"address is the dashboard's, port 8265 by default)") from None
    if mode == "disabled" or (mode is None and auth_mode() == "disabled"):
        return None
    token = find_ray_token()
    if mode == "token" and not token:
        raise UsageError(f"the cluster at {address} uses token authentication and no token was found here: "
                         f"set RAY_AUTH_TOKEN (print it on the head node with `ray get-auth-token`) or "
                         f"write it to ~/.ray/auth_token")
    return token


def make_client(address: str, token: str | None, patience: Patience | None = None):
    from ray.job_submission import JobSubmissionClient

    headers = {"Authorization": f"Bearer {token}"} if token else None

    def connect():
        return JobSubmissionClient(address, headers=headers)

    try:
        return patience.call(connect, "connecting to the Ray job server") if patience else connect()
    except UsageError:
        raise
    except Exception as e:  # ConnectionError, auth errors: explain without the headers
        raise UsageError(f"cannot connect to the Ray job server at {address}: {redact(str(e))}") from None


def _say(args, msg: str, err: bool = False) -> None:
    if err or not getattr(args, "quiet", False):
        print(redact(msg), file=sys.stderr if err else sys.stdout, flush=True)


def _patience(args, address: str) -> Patience:
    return Patience(address, float(getattr(args, "timeout", 300.0) or 300.0), lambda m: _say(args, m, err=True))


def cmd_submit(args) -> int:
    """Unless ``--verbose``, the Ray SDK's own INFO lines ("Uploading package ...", "WebSocket
    closed ...") are not shown; its warnings and errors are."""
    import logging

    import ray.dashboard.modules.job.sdk  # noqa: F401  (the SDK's loggers set their own INFO level)

    saved = {}
    if not getattr(args, "verbose", False):
        for name in ["ray"] + [n for n in logging.root.manager.loggerDict if n.startswith("ray.")]:
            lg = logging.getLogger(name)
            if lg.level and lg.level < logging.WARNING:
                saved[lg] = lg.level
                lg.setLevel(logging.WARNING)
    try:
        return _cmd_submit(args)
    finally:
        for lg, level in saved.items():
            lg.setLevel(level)


def _cmd_submit(args) -> int:
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
        patience = _patience(args, address)
        token = cluster_token(address, patience)
        spec = build_job(args.config, overrides=args.overrides, output=args.output, pass_env=args.pass_env,
                         working_dir=args.working_dir, token=token)
        try:
            return _submit(args, address, token, spec, patience)
        finally:
            spec.cleanup()

    address = resolve_address(args.address)
    patience = _patience(args, address)
    client = make_client(address, cluster_token(address, patience), patience)
    job_id = getattr(args, actions[0])
    if actions[0] == "status":
        info = _job_info(client, job_id, patience)
        print(f"{job_id}: {info.status}" + (f" ({redact(info.message)})" if info.message else ""))
        return 0
    if actions[0] == "stop":
        _job_info(client, job_id, patience)
        stopped = patience.call(lambda: client.stop_job(job_id), "stopping the job")
        print(f"{job_id}: {'stop requested' if stopped else 'already finished'}")
        return 0
    _job_info(client, job_id, patience)
    sys.stdout.write(redact(patience.call(lambda: client.get_job_logs(job_id), "reading the job's logs")))
    sys.stdout.flush()
    return 0


def _job_info(client, job_id: str, patience: Patience | None = None):
    try:
        if patience is not None:
            return patience.call(lambda: client.get_job_info(job_id), "reading the job's status")
        return client.get_job_info(job_id)
    except RuntimeError as e:
        raise UsageError(f"no job {job_id!r} on this cluster ({redact(str(e)).splitlines()[0]})") from None


def new_submission_id() -> str:
    return f"evoray-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def submit_with_patience(client, patience: Patience, submission_id: str, **kwargs) -> str:
    """``client.submit_job`` retried through ``patience``. A retry whose earlier attempt did reach
    the cluster finds the submission id taken: that job is ours, so it counts as submitted."""
    attempts = 0

    def once():
        nonlocal attempts
        attempts += 1
        try:
            return client.submit_job(submission_id=submission_id, **kwargs)
        except RuntimeError as e:
            if attempts > 1 and "already exists" in str(e):
                return submission_id
            raise

    return patience.call(once, "submitting the job")


def _submit(args, address: str, token: str | None, spec, patience: Patience | None = None) -> int:
    patience = patience or _patience(args, address)
    _say(args, f"submitting to {address}")
    for line in spec.describe().splitlines():
        _say(args, line)
    client = make_client(address, token, patience)
    submission_id = new_submission_id()
    try:
        job_id = submit_with_patience(client, patience, submission_id, entrypoint=spec.entrypoint,
                                      runtime_env=spec.runtime_env,
                                      metadata={"tool": "evoray", "config": os.path.basename(args.config)})
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(f"the cluster refused the job: {redact(str(e))}") from None
    print(f"job id: {job_id}", flush=True)
    if not args.follow:
        _say(args, f"follow it with: evoray submit --logs {job_id} --address {address}  "
                   f"(status: --status {job_id}, stop: --stop {job_id})")
        return 0
    return follow(client, job_id, quiet=args.quiet, patience=patience)


async def _tail(client, job_id: str, quiet: bool, printed: list[int]) -> None:
    """Print the job's log stream from character ``printed[0]`` on (a reconnected stream starts
    again at the beginning of the log), advancing ``printed[0]`` as it goes, so a stream that drops
    midway leaves the count of what was shown."""
    seen = 0
    async for chunk in client.tail_job_logs(job_id):
        skip = printed[0] - seen
        seen += len(chunk)
        new = chunk[skip:] if skip > 0 else chunk
        if new:
            printed[0] = seen
            if not quiet:
                sys.stdout.write(redact(new))
                sys.stdout.flush()


def follow(client, job_id: str, quiet: bool = False, poll_s: float = 1.0, patience: Patience | None = None,
           sleep: Callable[[float], None] = time.sleep) -> int:
    """Stream the job's logs until it ends, reconnecting a dropped stream; print the final status and
    the driver's exit code. Returns 0 when the job SUCCEEDED, else its exit code (or 1)."""
    patience = patience or Patience("the cluster", 300.0, lambda m: print(m, file=sys.stderr, flush=True))
    printed = [0]  # characters of the log shown so far
    drops = 0
    try:
        while True:
            try:
                asyncio.run(_tail(client, job_id, quiet, printed))
            except KeyboardInterrupt:
                raise
            except Exception as e:
                drops += 1
                print(f"log stream of {job_id} dropped ({redact(str(e)).splitlines()[0][:160] if str(e) else type(e).__name__}); "
                      f"reconnecting", file=sys.stderr, flush=True)
                if drops > 50:
                    raise UsageError(f"the log stream of {job_id} keeps dropping; the job runs on: "
                                     f"evoray submit --status {job_id}") from None
            info = _job_info(client, job_id, patience)
            if info.status.is_terminal():
                break
            sleep(poll_s)  # the stream ended or dropped early: reconnect
        # what the stream did not carry before the end (a drop near the end of the job)
        if not quiet:
            try:
                rest = patience.call(lambda: client.get_job_logs(job_id), "reading the job's logs")[printed[0]:]
                if rest:
                    sys.stdout.write(redact(rest))
                    sys.stdout.flush()
            except Exception:
                pass
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. Stop it with: evoray submit --stop {job_id}",
              file=sys.stderr)
        return 1
    status = getattr(info.status, "value", str(info.status))
    code = getattr(info, "driver_exit_code", None)
    msg = (f"job {job_id}: {status}" + (f", exit code {code}" if code is not None else "")
           + (f" ({redact(info.message)})" if info.message else ""))
    print(msg, file=sys.stdout if status == TERMINAL_OK else sys.stderr, flush=True)
    if status == TERMINAL_OK:
        return 0
    return code if isinstance(code, int) and 0 < code < 256 else 1
