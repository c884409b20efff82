"""The ``evoray`` command line (see INTERFACE.md for the surface).

Errors become exit codes only here: 0 done, 1 the job failed (too many failed rows, Ray lost, an
unexpected error), 2 bad usage / config / input (the message names the file and line or the config
key), 3 stopped at the budget cap.

Output levels (:mod:`evoray.console`): default = evoray's progress and summary; ``--quiet`` =
errors only plus the final line; ``--verbose`` = Ray's own log lines too.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from .errors import BudgetExceeded, EvorayError, RayLost, UsageError



def job_commands() -> tuple[str, ...]:
    """The commands that run a job from a config: every stage with a subcommand, ``run`` and ``estimate``."""
    from .stage import stages

    return tuple(s.name for s in stages() if getattr(s, "command", None) is not None) + ("run", "estimate")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own usage errors exit 2 too, with our prefix
        self.print_usage(sys.stderr)
        print(f"evoray: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def _job_args(p: argparse.ArgumentParser, with_input: bool = True) -> None:
    p.add_argument("config", help="job config YAML")
    if with_input:
        p.add_argument("-i", "--input", help="input data (overrides input.path)")
    p.add_argument("-o", "--output", help="output folder (overrides output.dir)")
    p.add_argument("--address", help="Ray cluster address; none = a local Ray started for the job")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override one config value (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the estimate and send nothing")
    _level_args(p)


def _level_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quiet", action="store_true", help="print only errors and the final line (outputs and counts)")
    g.add_argument("--verbose", action="store_true",
                   help="also print Ray's own log lines (otherwise they go to OUTDIR/logs/ray.log)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="evoray", description="Curate instruction-tuning data with LLMs on Ray.")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("ingest", help="read data into canonical rows")
    p.add_argument("sources", nargs="+", help="input files")
    p.add_argument("-o", "--output", required=True, help="OUT.parquet or OUT.jsonl")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "jsonl", "sharegpt", "gsm8k", "parquet"])
    p.add_argument("--map", default=None, help="instruction=FIELD,input=FIELD,output=FIELD")
    p.add_argument("--skip-invalid", action="store_true", help="send bad rows to OUT's quarantine file")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N valid rows")
    _level_args(p)

    from .stage import stages

    for st in sorted((s for s in stages() if getattr(s, "command", None) is not None), key=lambda s: s.command.rank):
        p = sub.add_parser(st.name, help=st.command.help)
        _job_args(p, with_input=st.command.with_input)
        if st.command.add_arguments is not None:
            st.command.add_arguments(p)
    p = sub.add_parser("run", help="the stages under pipeline:, in order")
    _job_args(p)
    p = sub.add_parser("estimate", help="requests, tokens and dollars per stage; sends nothing")
    _job_args(p)
    p = sub.add_parser("report", help="write OUTDIR/report.html")
    p.add_argument("outdir")
    _level_args(p)
    p = sub.add_parser("submit", help="run a config on a Ray cluster (Ray Jobs API)")
    p.add_argument("config", nargs="?", help="job config YAML")
    p.add_argument("--address", help="dashboard address, e.g. http://HEAD:8265 (or RAY_ADDRESS)")
    p.add_argument("--follow", action="store_true", help="stream the logs and exit with the job's status")
    p.add_argument("--pass-env", action="append", default=[], metavar="VAR",
                   help="pass this environment variable (e.g. OPENAI_API_KEY) to the job; never printed")
    p.add_argument("--status", metavar="JOB_ID", help="print a job's status")
    p.add_argument("--stop", metavar="JOB_ID", help="stop a job")
    p.add_argument("--logs", metavar="JOB_ID", help="print a job's logs")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE")
    p.add_argument("-o", "--output", help="output folder on the cluster")
    p.add_argument("--working-dir", help="folder to ship as the job's working_dir (default: the config's folder)")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long to wait for the cluster's dashboard and job agent (a fresh head starts them "
                        "after `ray start` returns) and to retry a dropped log stream; default 300")
    _level_args(p)
    p = sub.add_parser("export", help="a stage's table as Alpaca JSON, ShareGPT, OpenAI chat JSONL or a HF dataset")
    p.add_argument("source", help="a stage folder (its kept, answered or evolved table) or a table file")
    p.add_argument("-f", "--format", required=True, choices=["alpaca", "sharegpt", "openai", "hf"])
    p.add_argument("-o", "--output", help="output file (folder for hf); default SOURCE/export/TABLE.FORMAT[.json|.jsonl]")
    p.add_argument("--table", help="table name in the stage folder (default: kept, answered, evolved, the first found)")
    p.add_argument("--system", help="system message for --format openai")
    p.add_argument("--keep-empty", action="store_true", help="export rows without a response too (else counted as no_response)")
    _level_args(p)
    p = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    return ap


def _setup_logging(quiet: bool) -> None:
    from .console import CurrentStderrHandler
    from .secrets import install_log_redaction

    root = logging.getLogger()
    if not root.handlers:  # like logging.basicConfig: a host (pytest) that configured logging keeps it
        h = CurrentStderrHandler()  # follows sys.stderr, which a job's RayLogRoute swaps
        h.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(h)
        root.setLevel(logging.ERROR if quiet else logging.INFO)
    install_log_redaction()


def _open_sealed_environ() -> int | None:
    """A job submitted with ``--pass-env`` carries its keys sealed (``cluster.runtime_env``): open
    them into this process before anything else. A no-op when nothing was sealed."""
    if not os.environ.get("EVORAY_SEALED_ENV"):
        return None
    from cluster.runtime_env import SealError, unseal_environ

    try:
        unseal_environ()
    except SealError as e:
        print(f"evoray: error: cannot open the variables passed with --pass-env: {e}", file=sys.stderr)
        return 2
    return None


def describe_error(e: BaseException, logs: str | None = None) -> tuple[str, int]:
    """The one line printed for an error, and the exit code."""
    if isinstance(e, BudgetExceeded):
        return (f"evoray: stopped at the budget cap: {e}. Every finished row is kept; "
                f"raise budget_usd and run again to resume.", 3)
    if isinstance(e, UsageError):
        return f"evoray: error: {e}", 2
    if isinstance(e, RayLost):
        return f"evoray: failed: {e}" + (f"; Ray's logs: {logs}" if logs else ""), 1
    if isinstance(e, EvorayError):
        return f"evoray: failed: {e}", e.exit_code
    first = (str(e).strip().splitlines() or [""])[0][:300]
    where = f" (traceback in {logs})" if logs else ""
    return f"evoray: failed: unexpected {type(e).__name__}: {first}{where}", 1


def main(argv: list[str] | None = None) -> int:
    if (code := _open_sealed_environ()) is not None:
        return code
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("evoray: interrupted; finished stages are kept, a re-run resumes", file=sys.stderr)
        return 1
    except EvorayError as e:
        msg, code = describe_error(e)
        print(msg, file=sys.stderr)
        return code


def _dispatch(args) -> int:
    cmd = args.command
    if cmd == "ingest":
        from .commands import cmd_ingest

        return cmd_ingest(args)
    if cmd == "report":
        from .report import write_report

        path = write_report(args.outdir)
        print(f"report: {path}")  # the final line, printed at every level
        return 0
    if cmd == "export":
        from .commands import cmd_export

        return cmd_export(args)
    if cmd == "submit":
        from cluster.submit import cmd_submit

        return cmd_submit(args)
    if cmd == "config-reference":
        from .docs import config_reference

        print(config_reference())
        return 0
    from .commands import cmd_job

    return cmd_job(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
