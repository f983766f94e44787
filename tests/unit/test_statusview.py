"""`pgscale status` formatting: objects -> health, progress, rows -> text and JSON (no API server)."""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from typing import Any

import pytest

from pgscale import cli, statusview
from pgscale.api.databaseprofile import DatabaseProfileStatus
from pgscale.api.filemigration import FileMigrationStatus
from pgscale.api.partitionpolicy import PartitionPolicyStatus
from pgscale.api.retentionpolicy import RetentionPolicyStatus
from pgscale.statusview import build, health, parse, render_json, render_text

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
CREATED = "2025-03-01T10:00:00Z"


def cond(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": CREATED,
        "observedGeneration": 1,
    }


def obj(
    kind: str, name: str, spec: dict[str, Any], status: dict[str, Any] | None, *, ns: str = "shop", generation: int = 1
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": ns, "generation": generation, "creationTimestamp": CREATED},
        "spec": spec,
    }
    if status is not None:
        out["status"] = status
    return out


READY = [cond("Ready", "True", "Connected", "Connected to PostgreSQL 15.8")]


def profile(name: str = "app", ns: str = "shop", **status: Any) -> dict[str, Any]:
    spec = {"connection": {"secretRef": {"name": "app-db"}}, "parameters": {"work_mem": "4MB"}}
    return obj("DatabaseProfile", name, spec, {"observedGeneration": 1, "conditions": READY, **status}, ns=ns)


def child(
    kind: str, name: str, status: dict[str, Any] | None, profile_name: str = "app", **spec: Any
) -> dict[str, Any]:
    return obj(kind, name, {"profileRef": {"name": profile_name}, "table": {"name": "Task"}, **spec}, status)


SECRET = {("shop", "app-db"): {"uri": "postgresql://app:secret@db.shop:5432/shop", "password": "secret"}}


# --- health ------------------------------------------------------------------------------


def seen(*conditions: dict[str, Any]) -> dict[str, Any]:
    """A status of generation 1 with these conditions."""
    return {"observedGeneration": 1, "conditions": list(conditions)}


STALLED_TABLE = seen(cond("Ready", "False", "TableNotFound"), cond("Stalled", "True", "TableNotFound", "spec.table"))
COPYING = seen(cond("Ready", "False", "Copying"), cond("Reconciling", "True", "Copying", "1/2 rows"))
SUSPEND = {"suspend": True}


@pytest.mark.parametrize(
    ("status", "generation", "spec", "state", "reason"),
    [
        (None, 1, {}, "InProgress", "NotObserved"),
        (seen(*READY), 2, {}, "InProgress", "NotObserved"),
        (seen(*READY), 1, {}, "Current", "Connected"),
        (STALLED_TABLE, 1, {}, "Failed", "TableNotFound"),
        (COPYING, 1, {}, "InProgress", "Copying"),
        (seen(cond("Ready", "Unknown", "Waiting")), 1, {}, "InProgress", "Waiting"),
        (seen(), 1, {}, "InProgress", "NoReadyCondition"),
        # Suspended wins over Ready and Reconciling, not over Stalled.
        (seen(*READY), 1, SUSPEND, "Suspended", "Suspended"),
        (seen(cond("Stalled", "True", "SecretNotFound")), 1, SUSPEND, "Failed", "SecretNotFound"),
    ],
)
def test_health(status: Any, generation: int, spec: dict[str, Any], state: str, reason: str) -> None:
    h = health(parse(obj("RetentionPolicy", "p", spec, status, generation=generation)))
    assert (h.state, h.reason) == (state, reason)


def test_terminating() -> None:
    o = profile()
    o["metadata"] |= {"deletionTimestamp": CREATED, "finalizers": ["pgscale.io/cleanup"]}
    assert health(parse(o)) == statusview.Health(
        "Terminating", "Deleting", "waiting for finalizers: pgscale.io/cleanup"
    )


# --- humane numbers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (12 * 2**20, "12.0 MiB"), (3 * 2**40, "3.0 TiB"), (None, "-")],
)
def test_human_bytes(value: Any, text: str) -> None:
    assert statusview.human_bytes(value) == text


@pytest.mark.parametrize(
    ("value", "text"), [(0, "0s"), (46, "46s"), (60, "1m"), (320, "5m20s"), (7500, "2h5m"), (90000, "1d1h")]
)
def test_human_duration(value: float, text: str) -> None:
    assert statusview.human_duration(value) == text


def test_human_rate() -> None:
    assert statusview.human_rate(0.5, "rows") == "0.5 rows/s"
    assert statusview.human_rate(1234.4, "rows") == "1,234 rows/s"


# --- statuses read through the kinds' models ----------------------------------------------


def test_a_status_is_read_by_its_kinds_model() -> None:
    res = parse(child("PartitionPolicy", "p", {"observedGeneration": 1, "partitionCount": 3, "conditions": READY}))
    assert isinstance(res.status, PartitionPolicyStatus)
    assert (res.status.partition_count, res.status.conditions[0].reason) == (3, "Connected")
    assert isinstance(parse(profile()).status, DatabaseProfileStatus)
    assert parse(child("RetentionPolicy", "r", None)).status == RetentionPolicyStatus()


def test_another_versions_status_still_reads() -> None:
    """What an operator of another version wrote: unknown fields are ignored, unreadable ones left out."""
    status = PartitionPolicyStatus.from_stored(
        {
            "partitionCount": 4,
            "partitioned": True,
            "lastError": "an old field",
            "conversion": {"step": "a-step-of-the-future", "rowsDone": 5},
            "lastMaintenance": {"time": CREATED, "created": ["Task_2025_07"], "newCounter": 3},
        }
    )
    assert (status.partition_count, status.partitioned, status.conversion) == (4, True, None)
    assert status.last_maintenance is not None and status.last_maintenance.created == ["Task_2025_07"]
    assert FileMigrationStatus.from_stored("not an object") == FileMigrationStatus()
    assert FileMigrationStatus.from_stored({"phase": None, "rowsTotal": 3}).rows_total == 3


def test_what_the_controllers_write_is_what_the_view_reads() -> None:
    """A status built from the models, as the controllers build it, sent as the API server stores it."""
    from pgscale.api.filemigration import FailedRow
    from pgscale.api.partitionpolicy import MaintenanceRun, ProgressStatus
    from pgscale.api.retentionpolicy import RunStatus, TotalsStatus

    written = PartitionPolicyStatus(
        observed_generation=1,
        partitioned=True,
        partition_count=6,
        conversion=ProgressStatus(step="done", rows_done=1200),
        last_maintenance=MaintenanceRun(time=CREATED, dropped=["Task_2024_01"]),
    )
    pp = parse(child("PartitionPolicy", "p", written.wire()))
    assert statusview.progress(pp, wide=True) == (
        f"6 partitions; converted with 1,200 rows; last maintenance {CREATED}: dropped 1"
    )
    run = RunStatus(outcome="Partial", rows_deleted=30, duration_seconds=61.0)
    rp = parse(child("RetentionPolicy", "r", RetentionPolicyStatus(last_run=run, totals=TotalsStatus(runs=2)).wire()))
    assert (
        statusview.progress(rp, wide=True)
        == "last run Partial: 30 deleted in 1m1s; total 2 runs, 0 archived, 0 deleted"
    )
    fm = FileMigrationStatus(
        phase="Verifying", rows_total=4, rows_migrated=4, failed_rows=[FailedRow(key="7", reason="x")]
    )
    assert statusview.progress(parse(child("FileMigration", "f", fm.wire()))) == "Verifying (4/4 rows)"


# --- progress per kind -------------------------------------------------------------------


def test_file_migration_progress() -> None:
    status = {
        "phase": "Copying",
        "progress": "45.0%",
        "rowsTotal": 1000,
        "rowsMigrated": 450,
        "rowsFailed": 3,
        "rowsPerSecond": 12.0,
        "bytesPerSecond": 1.5 * 2**20,
        "etaSeconds": 46,
        "bytesMigrated": 5 * 2**20,
        "jobName": "files-to-s3-copy-1",
    }
    fm = FileMigrationStatus.from_stored(status)
    assert statusview.files_progress(fm) == (
        "Copying 45.0% (450/1,000 rows, 3 failed), 12.0 rows/s, 1.5 MiB/s, ETA 46s"
    )
    wide = statusview.files_progress(fm, wide=True)
    assert wide.endswith("5.0 MiB written, Job files-to-s3-copy-1")
    done = FileMigrationStatus.from_stored(
        {"phase": "Completed", "progress": "100.0%", "rowsTotal": 2, "rowsMigrated": 2, "rowsPerSecond": 3.0}
    )
    assert statusview.files_progress(done) == "Completed 100.0% (2/2 rows)"
    assert statusview.files_progress(FileMigrationStatus.from_stored(None)) == "-"


def test_retention_progress() -> None:
    running = {
        "lastRun": {
            "outcome": "Running",
            "rowsArchived": 1200,
            "rowsTotal": 4800,
            "rowsPerSecond": 400.0,
            "etaSeconds": 9,
        }
    }
    rp = RetentionPolicyStatus.from_stored(running)
    assert statusview.retention_progress(rp) == "running, 25.0%, 1,200/4,800 rows, 400 rows/s, ETA 9s"
    last = {
        "lastRun": {"outcome": "Succeeded", "rowsArchived": 1200, "durationSeconds": 3.2, "rowsPerSecond": 375.0},
        "nextRunTime": "2025-04-01T02:00:00Z",
        "totals": {"runs": 3, "rowsArchived": 5000, "rowsDeleted": 0},
    }
    rp = RetentionPolicyStatus.from_stored(last)
    assert statusview.retention_progress(rp) == "last run Succeeded: 1,200 archived in 3s 375 rows/s"
    assert statusview.retention_progress(rp, wide=True).endswith(
        "; next 2025-04-01T02:00:00Z; total 3 runs, 5,000 archived, 0 deleted"
    )
    dry = RetentionPolicyStatus.from_stored({"lastRun": {"outcome": "DryRun", "rowsMatched": 42}})
    assert statusview.retention_progress(dry) == "last run DryRun: 42 rows would move"
    assert statusview.retention_progress(RetentionPolicyStatus.from_stored({})) == "no run yet"
    assert statusview.retention_progress(RetentionPolicyStatus.from_stored({"lastRun": {}})) == "no run yet"


def test_partition_progress() -> None:
    converting = {
        "partitioned": False,
        "conversion": {
            "step": "prepared",
            "rowsTotal": 10000,
            "rowsDone": 2500,
            "rowsPerSecond": 500.0,
            "etaSeconds": 15,
            "longestLockMs": 120,
        },
    }
    pp = PartitionPolicyStatus.from_stored(converting)
    assert statusview.partition_progress(pp) == "converting: prepared, 25.0%, 2,500/10,000 rows, 500 rows/s, ETA 15s"
    assert statusview.partition_progress(pp, wide=True).endswith("ETA 15s, longest lock 120 ms")
    kept = {
        "partitioned": True,
        "partitionCount": 17,
        "nextMaintenanceTime": "2025-03-01T13:00:00Z",
        "lastMaintenance": {
            "time": "2025-03-01T12:00:00Z",
            "created": ["Task_2025_07"],
            "detached": [],
            "dropped": [],
            "rowsMovedFromDefault": 5,
        },
    }
    pp = PartitionPolicyStatus.from_stored(kept)
    assert statusview.partition_progress(pp) == "17 partitions"
    assert statusview.partition_progress(pp, wide=True) == (
        "17 partitions; last maintenance 2025-03-01T12:00:00Z: created 1, 5 rows moved from DEFAULT; "
        "next 2025-03-01T13:00:00Z"
    )
    assert statusview.partition_progress(PartitionPolicyStatus.from_stored({"partitioned": False})) == (
        "not partitioned"
    )
    converted = {"partitioned": True, "partitionCount": 6, "conversion": {"step": "done", "rowsDone": 1200}}
    pp = PartitionPolicyStatus.from_stored(converted)
    assert statusview.partition_progress(pp) == "6 partitions"
    assert statusview.partition_progress(pp, wide=True) == "6 partitions; converted with 1,200 rows"


def summary(p: dict[str, Any]) -> dict[str, str]:
    return dict(statusview.profile_summary(p["spec"], DatabaseProfileStatus.from_stored(p["status"])))


def test_profile_summary() -> None:
    p = profile(
        serverVersion="15.8",
        parameters=[
            {"name": "work_mem", "desired": "4MB", "source": "parameters"},
            {"name": "shared_buffers", "desired": "256MB", "source": "parameters", "pendingRestart": True},
        ],
        pendingRestart=["shared_buffers"],
        pooler={"service": "app-pooler", "readOnlyService": "app-pooler-ro", "instances": 2, "configHash": "x"},
        replicas=[
            {"name": "app-replica-0", "slot": "s0", "active": True, "lagBytes": 2048, "lagSeconds": 0.25},
            {"name": "app-replica-1", "slot": "s1", "active": False},
        ],
        capacity={
            "databaseBytes": 7 * 2**30,
            "databaseSize": "7 GB",
            "growthBytesPerMonth": 2**30,
            "projectedBytes": 19 * 2**30,
            "horizonMonths": 12,
            "recommendedTier": "production",
        },
        alerts=[{"name": "ConnectionUtilization", "value": 91.5, "threshold": 80, "since": CREATED}],
    )
    p["spec"] |= {"pooling": {"poolMode": "session"}, "readReplicas": {"instances": 2}}
    assert summary(p) == {
        "settings": "2 managed (from parameters), 1 pending restart: shared_buffers",
        "pooler": "app-pooler (2 instances, pool mode session), read-only app-pooler-ro",
        "replicas": "1/2 streaming, max lag 2.0 KiB / 0.2s",
        "capacity": "7 GB, growing 1.0 GiB/month, 19.0 GiB in 12 months, tier production advised",
        "alerts": f"ConnectionUtilization 91.5 > 80 since {CREATED}",
    }
    bare = summary(profile())
    assert bare == {
        "settings": "0 managed, none pending restart",
        "pooler": "off",
        "replicas": "none",
        "capacity": "no sample yet",
        "alerts": "none",
    }
    asked = profile()
    asked["spec"]["readReplicas"] = {"storage": {"size": "1Gi"}}  # instances: the model's default
    assert summary(asked)["replicas"] == "0/1 streaming"


def test_database_never_shows_the_password() -> None:
    p = profile()
    assert statusview.database(parse(p), SECRET) == "app@db.shop:5432/shop (Secret app-db)"
    assert "secret" not in statusview.database(parse(p), SECRET).replace("Secret", "")
    assert statusview.database(parse(p), {("shop", "app-db"): None}) == "Secret app-db not found"
    assert statusview.database(parse(p), {}) == "through Secret app-db (not readable)"
    p["spec"]["connection"] |= {"host": "pg.shop", "dbname": "orders"}
    assert statusview.database(parse(p), {}) == "through Secret app-db (not readable), host pg.shop, dbname orders"
    assert (
        statusview.database(parse(p), {("shop", "app-db"): {"username": "u"}})
        == "u@pg.shop:5432/orders (Secret app-db)"
    )
    bad = statusview.database(parse(profile()), {("shop", "app-db"): {"username": "u"}})
    assert bad.startswith("Secret app-db: connection has no host, dbname")


# --- the view ----------------------------------------------------------------------------


def sample() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    profiles = [
        profile(serverVersion="15.8", capacity={"databaseBytes": 8 * 2**20, "databaseSize": "8 MB"}),
        profile("reports"),
    ]
    stalled = [
        cond("Ready", "False", "TableNotFound", 'spec.table: table "public"."task" does not exist'),
        cond("Stalled", "True", "TableNotFound", 'spec.table: table "public"."task" does not exist'),
    ]
    children = [
        child(
            "FileMigration",
            "files-to-s3",
            {
                "observedGeneration": 1,
                "phase": "Copying",
                "progress": "50.0%",
                "rowsTotal": 10,
                "rowsMigrated": 5,
                "conditions": [
                    cond("Ready", "False", "Copying", "Copying: 5/10"),
                    cond("Reconciling", "True", "Copying", "Copying: 5/10"),
                ],
            },
        ),
        child(
            "RetentionPolicy",
            "archive",
            {
                "observedGeneration": 1,
                "conditions": [
                    cond("Ready", "True", "Scheduled", "next run 2025-04-01T02:00:00Z"),
                    cond("LastRunSucceeded", "True", "Succeeded"),
                ],
            },
        ),
        child("PartitionPolicy", "by-month", {"observedGeneration": 1, "conditions": stalled}),
        child("RetentionPolicy", "lost", None, profile_name="gone"),
    ]
    return profiles, children


def test_build_groups_by_profile_ref() -> None:
    profiles, children = sample()
    views = build(profiles, children, SECRET, now=NOW)
    assert [(v.name, v.found) for v in views] == [("app", True), ("gone", False), ("reports", True)]
    app, gone, reports = views
    assert [(r.kind, r.name, r.state) for r in app.rows] == [
        ("DatabaseProfile", "app", "Current"),
        ("PartitionPolicy", "by-month", "Failed"),
        ("RetentionPolicy", "archive", "Current"),
        ("FileMigration", "files-to-s3", "InProgress"),
    ]
    assert app.database == "app@db.shop:5432/shop (Secret app-db)"
    assert gone.database == "not found; 1 resource points at it"
    assert [(r.name, r.ready, r.state) for r in gone.rows] == [("lost", "-", "InProgress")]
    assert [r.name for r in reports.rows] == ["reports"]
    assert [v.name for v in build(profiles, children, SECRET, now=NOW, only="app")] == ["app"]


def test_same_profile_name_in_two_namespaces_stays_apart() -> None:
    views = build([profile(ns="a"), profile(ns="b")], [child("FileMigration", "f", None)], {}, now=NOW)
    assert [(v.namespace, v.name, len(v.rows)) for v in views] == [("a", "app", 1), ("b", "app", 1), ("shop", "app", 1)]
    assert views[2].found is False


def test_render_text() -> None:
    profiles, children = sample()
    text = render_text(build(profiles, children, SECRET, now=NOW))
    lines = text.splitlines()
    assert lines[0] == "DatabaseProfile shop/app: app@db.shop:5432/shop (Secret app-db), PostgreSQL 15.8"
    assert lines[1:6] == [
        "  settings  0 managed, none pending restart",
        "  pooler    off",
        "  replicas  none",
        "  capacity  8 MB, growth known after a day of samples",
        "  alerts    none",
    ]
    header = lines[7]
    assert header.split() == ["KIND", "NAME", "READY", "STATE", "REASON", "PROGRESS", "MESSAGE"]
    # Columns line up: every row's STATE starts where the header's does.
    col = header.index("STATE")
    table = lines[7:12]
    assert [line[col:].split()[0] for line in table] == ["STATE", "Current", "Failed", "Current", "InProgress"]
    assert "by-month     False  Failed      TableNotFound  -" in text
    assert 'spec.table: table "public"."task" does not exist' in text
    assert "Copying 50.0% (5/10 rows)" in text
    assert "DatabaseProfile shop/gone: not found; 1 resource points at it" in text
    assert "RetentionPolicy  lost  -      InProgress  NotObserved" in text


def test_render_wide_adds_table_generation_conditions_age() -> None:
    profiles, children = sample()
    text = render_text(build(profiles, children, SECRET, now=NOW, wide=True), wide=True)
    header = next(line for line in text.splitlines() if "KIND" in line)
    assert header.split() == [
        "KIND",
        "NAME",
        "READY",
        "STATE",
        "REASON",
        "PROGRESS",
        "TABLE",
        "GEN",
        "CONDITIONS",
        "AGE",
        "MESSAGE",
    ]
    archive = next(line for line in text.splitlines() if " archive " in line)
    assert "public.Task" in archive and "1/1" in archive and "LastRunSucceeded=True" in archive and "2h" in archive


def test_render_json() -> None:
    profiles, children = sample()
    data = json.loads(render_json(build(profiles, children, SECRET, now=NOW)))
    app = data["profiles"][0]
    assert app["summary"]["pooler"] == "off" and app["found"] is True
    fm = next(r for r in app["rows"] if r["kind"] == "FileMigration")
    assert fm["state"] == "InProgress" and fm["reason"] == "Copying" and fm["conditions"][1]["type"] == "Reconciling"
    # Conditions as the API server has them: camelCase, as in `kubectl get -o json`.
    assert fm["conditions"][0] == cond("Ready", "False", "Copying", "Copying: 5/10")


def test_cli_parses_status_like_kubectl() -> None:
    args = cli.parser().parse_args(["status", "-n", "shop", "-o", "wide", "app"])
    assert (args.namespace, args.output, args.profile, args.func) == ("shop", "wide", "app", cli.cmd_status)
    args = cli.parser().parse_args(["status", "-A"])
    assert args.all_namespaces and args.profile is None
    with pytest.raises(SystemExit):
        cli.parser().parse_args(["status", "-A", "-n", "shop"])
    assert isinstance(args, argparse.Namespace)


def test_api_error_prefers_the_servers_message() -> None:
    class Forbidden(Exception):
        status, reason = 403, "Forbidden"
        body = json.dumps({"message": 'databaseprofiles.pgscale.io is forbidden: User "x" cannot list resource'})

    assert statusview.api_error(Forbidden()).startswith("databaseprofiles.pgscale.io is forbidden")
    Forbidden.body = "not json"
    assert statusview.api_error(Forbidden()) == "403 Forbidden"


def test_without_a_kubeconfig_it_says_so(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cli.main(["status"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pgscale status: ") and "Traceback" not in err
    assert cli.main(["status", "--kubeconfig", str(tmp_path / "missing"), "--context", "nope"]) == 1


def test_retention_progress_shows_what_export_moved_out() -> None:
    from pgscale.api.retentionpolicy import ExportStatus, RetentionPolicyStatus, RunStatus
    from pgscale.statusview import retention_progress

    status = RetentionPolicyStatus(
        last_run=RunStatus(outcome="Succeeded", rows_archived=1200, duration_seconds=3.0, rows_per_second=400.0),
        export=ExportStatus(
            files=3,
            rows=1800,
            bytes=2 * 1024 * 1024,
            database_bytes_freed=9 * 1024 * 1024,
            oldest="2024-01-01T00:00:00Z",
            newest="2026-09-01T00:00:00Z",
        ),
    )
    text = retention_progress(status, wide=True)
    assert "exported 1,800 rows in 3 files" in text and "freed in the database" in text
    assert "2024-01-01T00:00:00Z to 2026-09-01T00:00:00Z" in text


def test_cache_progress() -> None:
    from pgscale.api.cache import CacheStatus

    written = CacheStatus(maxmemory="192Mi", tables=["public.Task"], outbox_depth=1200)
    written.service, written.app_secret = "tasks-cache", "tasks-cache-app"
    res = parse(child("Cache", "tasks", written.wire()))
    assert statusview.progress(res) == "192Mi maxmemory, 1 table, outbox 1,200"
    assert statusview.progress(res, wide=True).endswith("Service tasks-cache, Secret tasks-cache-app")
    assert statusview.progress(parse(child("Cache", "tasks", {}))) == "-"
