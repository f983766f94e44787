"""The `pgscale` command: run the operator, print CRDs, run jobs."""

from __future__ import annotations

import argparse
import asyncio
import difflib
import importlib
import json
import logging
import os
import socket
import sys
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from . import __version__

if TYPE_CHECKING:
    from .leader import LeaseConfig

JobCommand = Callable[[argparse.Namespace], int]
# `pgscale job <name>`: the commands Jobs and CronJobs run -> (summary, module with main(args)).
JOBS: dict[str, tuple[str, str]] = {
    "retention": ("one run of a RetentionPolicy: archive or delete old rows in batches", "pgscale.jobs.retention"),
    "file-migration": ("move the files of a FileMigration to object storage", "pgscale.jobs.files"),
    "partition-maintenance": (
        "convert a PartitionPolicy's table if needed, then create, detach or drop partitions",
        "pgscale.jobs.partitions",
    ),
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry)


def setup_logging(fmt: str, level: str) -> None:
    """One handler on the root logger, in the chosen format, behind the redaction filter."""
    from .redact import install_logging_filter

    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    install_logging_filter()
    logging.captureWarnings(True)  # warnings.warn texts pass the same filter
    for noisy in ("kubernetes.client.rest", "urllib3", "botocore", "s3transfer", "kopf.objects"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Its "Retrying ... connection broken" warnings repeat what the worker's one line per retry says.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def cmd_run(args: argparse.Namespace) -> int:
    from . import kube, runtime
    from .metrics import METRICS
    from .monitoring import COLLECTOR

    kube.load_config()
    if args.metrics_port:
        METRICS.registry.register(COLLECTOR)  # every profile's database figures
        METRICS.serve(args.metrics_port)
    namespaces = [] if args.all_namespaces else (args.namespace or [])
    lease = lease_config(args) if args.leader_election else None
    if lease is not None and lease.problems():
        print(f"pgscale run: {'; '.join(lease.problems())}", file=sys.stderr)
        return 2
    asyncio.run(
        runtime.run(
            namespaces=namespaces,
            liveness_port=args.liveness_port,
            workers=args.workers,
            resync_seconds=args.resync_seconds,
            lease=lease,
        )
    )
    return 0


# The one default of the worker count (the chart passes --workers only when operator.workers is set).
# 1,000 DatabaseProfiles and 1,000 RetentionPolicies became Ready 1.7x sooner with 8 than with 4 (bench/profiles.py).
DEFAULT_WORKERS = 8

SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


def lease_config(args: argparse.Namespace) -> LeaseConfig:
    """The Lease from the flags; namespace and identity default to the pod's own."""
    from .leader import LeaseConfig

    namespace = args.leader_election_namespace or os.environ.get("POD_NAMESPACE")
    if not namespace and SERVICE_ACCOUNT_NAMESPACE.exists():
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip()
    identity = args.leader_election_identity or os.environ.get("POD_NAME")
    if not identity:
        identity = f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    return LeaseConfig(
        name=args.leader_election_name,
        namespace=namespace or "default",
        identity=identity,
        lease_duration=args.lease_duration_seconds,
        renew_seconds=args.lease_renew_seconds,
    )


def cmd_crds(args: argparse.Namespace) -> int:
    from .api.crdgen import all_crds

    crds = all_crds()
    if args.check:
        stale = []
        for name, text in crds.items():
            path = Path(args.check) / name
            current = path.read_text() if path.exists() else ""
            if current != text:
                stale.append(name)
                sys.stdout.writelines(
                    difflib.unified_diff(current.splitlines(True), text.splitlines(True), str(path), "generated")
                )
        if stale:
            print(f"stale CRDs: {', '.join(stale)}; run `pgscale crds --write {args.check}`", file=sys.stderr)
            return 1
        return 0
    if args.write:
        out = Path(args.write)
        out.mkdir(parents=True, exist_ok=True)
        for name, text in crds.items():
            (out / name).write_text(text)
            print(f"wrote {out / name}", file=sys.stderr)
        return 0
    sys.stdout.write("---\n".join(crds.values()))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from . import statusview

    return statusview.main(args)


def archive_arguments(p: argparse.ArgumentParser) -> None:
    """`pgscale archive list|restore` options."""
    sub = p.add_subparsers(dest="archive", required=True)
    for name, summary in (
        ("list", "the files a RetentionPolicy exported: table, rows, bytes, ageColumn and key range, where"),
        ("restore", "insert exported rows back (whole batches, idempotent: rows whose key is present are skipped)"),
    ):
        c = sub.add_parser(name, help=summary)
        c.add_argument("-n", "--namespace", required=True, help="namespace of the RetentionPolicy")
        which = c.add_mutually_exclusive_group(required=True)
        which.add_argument("--policy", help="name of the RetentionPolicy (action export)")
        which.add_argument("--partition-policy", help="name of the PartitionPolicy (retention.action export)")
        c.add_argument("--since", type=instant, help="batches with rows whose ageColumn is at or after this")
        c.add_argument("--until", type=instant, help="batches with rows whose ageColumn is before this")
        c.add_argument("--partition", help="the files of one exported partition")
        if name == "list":
            c.add_argument("-o", "--output", choices=["text", "json"], default="text", help="output format")
        else:
            c.add_argument("--all", action="store_true", help="every exported batch of the policy")
            c.add_argument("--into-schema", help="restore into tables of the same names in this schema (created)")


def instant(text: str) -> datetime:
    """A time on the command line: ISO 8601, UTC unless it names a zone."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def cmd_archive(args: argparse.Namespace) -> int:
    from . import archive

    return archive.main(args)


def cmd_job(args: argparse.Namespace) -> int:
    module = importlib.import_module(JOBS[args.job][1])
    return int(module.main(args))


def cmd_cache(args: argparse.Namespace) -> int:
    from . import relay

    return relay.main(args)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pgscale", description="Scale the Postgres an application already has.")
    p.add_argument("--version", action="version", version=f"pgscale {__version__}")
    p.add_argument("--log-format", choices=["text", "json"], default=os.environ.get("PGSCALE_LOG_FORMAT", "text"))
    p.add_argument("--log-level", default=os.environ.get("PGSCALE_LOG_LEVEL", "info"))
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the operator")
    scope = run.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="watch this namespace (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (default)")
    run.add_argument("--liveness-port", type=int, default=8080, help="serve /healthz here; 0 disables")
    run.add_argument("--metrics-port", type=int, default=9090, help="serve /metrics here; 0 disables")
    run.add_argument(
        "--workers",
        type=int,
        default=DEFAULT_WORKERS,
        help="reconciles running at once (a reconcile mostly waits on the API server and the database)",
    )
    run.add_argument("--resync-seconds", type=float, default=300.0, help="re-check interval of Ready resources")
    le = run.add_argument_group("leader election", "with several replicas, only the holder of a Lease reconciles")
    le.add_argument(
        "--leader-election",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="reconcile only while holding the Lease (the chart turns it on)",
    )
    le.add_argument("--leader-election-name", default="pgscale", metavar="NAME", help="the Lease's name")
    le.add_argument(
        "--leader-election-namespace",
        metavar="NS",
        help="the Lease's namespace (default: $POD_NAMESPACE, else the pod's own namespace)",
    )
    le.add_argument(
        "--leader-election-identity",
        metavar="ID",
        help="this replica's name in the Lease (default: $POD_NAME, else host name and a random suffix)",
    )
    le.add_argument(
        "--lease-duration-seconds",
        type=float,
        default=15.0,
        help="a standby takes over when the leader has not renewed for this long",
    )
    le.add_argument("--lease-renew-seconds", type=float, default=5.0, help="how often the leader renews")
    run.set_defaults(func=cmd_run)

    crds = sub.add_parser("crds", help="print, write or check the CustomResourceDefinitions")
    where = crds.add_mutually_exclusive_group()
    where.add_argument("--write", metavar="DIR", help="write one file per CRD into DIR")
    where.add_argument("--check", metavar="DIR", help="exit 1 when DIR differs from the models")
    crds.set_defaults(func=cmd_crds)

    job = sub.add_parser("job", help="commands that pgscale's Jobs and CronJobs run")
    jobs = job.add_subparsers(dest="job", required=True)
    for name, (summary, _) in sorted(JOBS.items()):
        jp = jobs.add_parser(name, help=summary)
        jp.add_argument("--namespace", help="namespace of the resource (read from the pod's input in a Job)")
        jp.add_argument("--name", help="name of the resource")
        jp.add_argument("--dry-run", action="store_true", help="report what would change, change nothing")
    job.set_defaults(func=cmd_job)

    cold = sub.add_parser("archive", help="list or restore the files a RetentionPolicy exported (action export)")
    archive_arguments(cold)
    cold.set_defaults(func=cmd_archive)

    cache = sub.add_parser("cache", help="a Cache's processes")
    caches = cache.add_subparsers(dest="cache", required=True)
    relay = caches.add_parser("relay", help="delete the keys a Cache's outbox holds in the cache (its relay pod)")
    relay.add_argument("--metrics-port", type=int, default=9090, help="serve /metrics here; 0 disables")
    relay.add_argument("--once", action="store_true", help="drain the outbox once and exit")
    cache.set_defaults(func=cmd_cache)

    from . import statusview  # light: its heavy imports wait until it runs

    status = sub.add_parser("status", help="each DatabaseProfile with the policies using it: conditions, progress")
    statusview.add_arguments(status)
    status.set_defaults(func=cmd_status)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command != "crds":  # everything but the CRDs may print what a Secret holds: redact it
        from .redact import redact_std_streams, remember_environment

        remember_environment()
        redact_std_streams()
    setup_logging(args.log_format, args.log_level)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
