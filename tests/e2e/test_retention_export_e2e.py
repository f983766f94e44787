"""RetentionPolicy action export end to end: the operator checks the bucket and renders the CronJob with
the bucket's keys; the CronJob's pod command, run for real with the Secrets the kubelet would inject,
exports 90-day-old completed tasks to the S3 server; DuckDB reads the files back; `pgscale archive`
lists and restores them; a bucket that cannot take files stalls the policy naming the field."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import localenv
import psycopg
import pytest

from conftest import ROOT, Kubectl, run_container, s3_user, scalar, seed_tasks
from pgscale.storage import s3_client

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.s3]

BIN = Path(sys.executable).parent
PREDICATE = """status = 'COMPLETED' AND "completedAt" < now() - interval '90 days'"""
DIGEST = """SELECT count(*), md5(coalesce(string_agg(id || '|' || title || '|' || status || '|'
            || (extract(epoch FROM "completedAt") * 1000000)::bigint, ',' ORDER BY id), '')) FROM "Task" WHERE {}"""
DUCK_DIGEST = """SELECT count(*), md5(coalesce(string_agg(id::varchar || '|' || title || '|' || status || '|'
                 || epoch_us("completedAt")::varchar, ',' ORDER BY id), '')) FROM read_parquet({})"""


def cluster_secrets(kubectl: Kubectl, *names: str) -> dict[str, dict[str, str]]:
    """Secrets as the kubelet would inject them."""
    return {
        n: {k: base64.b64decode(v).decode() for k, v in kubectl.get("secret", n).get("data", {}).items()} for n in names
    }


def wait_status(kubectl: Kubectl, name: str, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get("retentionpolicy", name)
        if check(obj.get("status", {})):
            return obj
        time.sleep(0.5)
    raise AssertionError(f"status never matched: {json.dumps(obj.get('status'), indent=1)}")


def policy(name: str, bucket: str, endpoint: str, secret: str = "cold-s3") -> dict[str, Any]:
    return {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "RetentionPolicy",
        "metadata": {"name": name},
        "spec": {
            "profileRef": {"name": "app"},
            "table": {"name": "Task"},
            "ageColumn": "completedAt",
            "olderThan": "90d",
            "filters": [{"column": "status", "operator": "In", "values": ["COMPLETED"]}],
            "action": "export",
            "export": {
                "destination": {
                    "s3": {
                        "bucket": bucket,
                        "prefix": "app/",
                        "endpoint": endpoint,
                        "credentialsSecretRef": {"name": secret},
                    }
                },
                "rowsPerFile": 400,
            },
            "children": {"mode": "archive"},
        },
    }


def archive_cli(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        [str(BIN / "pgscale"), "archive", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_export_completed_tasks_to_s3_read_back_with_duckdb_and_restore(
    operator: Any,
    control_plane: Any,
    kubectl: Kubectl,
    postgres: Any,
    database: str,
    app_secret: str,
    s3_server: Any,
    tmp_path: Path,
) -> None:
    bucket = f"cold-{uuid.uuid4().hex[:8]}"
    client = s3_client(s3_server.endpoint, "us-east-1", s3_server.ACCESS_KEY, s3_server.SECRET_KEY, True)
    client.create_bucket(Bucket=bucket)
    kubectl.secret(
        "cold-s3", {"AWS_ACCESS_KEY_ID": s3_server.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3_server.SECRET_KEY}
    )
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 4000)
        conn.execute(
            """INSERT INTO "Message" ("taskId", body) SELECT id, 'about ' || id FROM "Task" WHERE id % 4 = 0"""
        )
        expected = conn.execute(DIGEST.format(PREDICATE)).fetchone()
        assert expected is not None and expected[0] > 1000
        removed = conn.execute(f'SELECT * FROM "Task" WHERE {PREDICATE} ORDER BY id').fetchall()
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        kubectl.apply(policy("export-tasks", bucket, s3_server.endpoint))
        kubectl.wait("retentionpolicy", "export-tasks", "Ready", timeout=90)

        cron = kubectl.get("cronjob", "export-tasks-retention")
        pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == {
            "name": "cold-s3",
            "key": "AWS_SECRET_ACCESS_KEY",
        }
        result = run_container(pod, cluster_secrets(kubectl, "app-db", "cold-s3"))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.strip().splitlines()[-1])
        assert report["outcome"] == "Succeeded" and report["rows_archived"] == expected[0], report
        # The table shrinks: the rows are gone (their space reusable after VACUUM), none is left behind.
        assert scalar(conn, f'SELECT count(*) FROM "Task" WHERE {PREDICATE}') == 0
        conn.execute('VACUUM "Task"')
        assert scalar(conn, 'SELECT count(*) FROM "Task"') == 4000 - expected[0]
        files = conn.execute(
            "SELECT object_key, rows, sha256, source_table FROM pgscale.export_files ORDER BY id"
        ).fetchall()
        messages = scalar(conn, """SELECT count(*) FROM "Message" """)

    # The files and their manifests are in the bucket; DuckDB reads the same rows back.
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="app/public.Task/").get("Contents", [])}
    task_files = [f for f in files if f[3] == "Task"]
    assert {"app/" + f[0] for f in task_files} | {
        "app/" + f[0].replace(".parquet", ".manifest.json") for f in task_files
    } == keys
    paths = []
    for key, rows, sha, _ in task_files:
        path = tmp_path / key.replace("/", "_")
        path.write_bytes(client.get_object(Bucket=bucket, Key="app/" + key)["Body"].read())
        manifest = json.loads(
            client.get_object(Bucket=bucket, Key="app/" + key.replace(".parquet", ".manifest.json"))["Body"].read()
        )
        assert manifest["rows"] == rows and manifest["sha256"] == sha
        paths.append(str(path))
    got = duckdb.connect().execute(DUCK_DIGEST.format(json.dumps(paths).replace('"', "'"))).fetchone()
    assert got == tuple(expected)

    # Status and the CLI.
    kubectl.run("annotate", "rp", "export-tasks", "pgscale.io/reconcile-at=1", "--overwrite")
    obj = wait_status(kubectl, "export-tasks", lambda s: (s.get("export") or {}).get("files", 0) == len(files))
    exported = obj["status"]["export"]
    assert exported["rows"] == sum(f[1] for f in files) and exported["databaseBytesFreed"] > 0
    assert exported["location"] == f"s3://{bucket}/app/"
    assert obj["status"]["lastRun"]["rowsArchived"] == expected[0]
    listed = archive_cli(
        control_plane.kubeconfig, "list", "-n", kubectl.namespace, "--policy", "export-tasks", "-o", "json"
    )
    assert listed.returncode == 0, listed.stderr
    assert sum(r["rows"] for r in json.loads(listed.stdout) if r["table"] == "public.Task") == expected[0]
    runs = []
    for _ in range(2):  # twice: the second inserts nothing
        restored = archive_cli(
            control_plane.kubeconfig, "restore", "-n", kubectl.namespace, "--policy", "export-tasks", "--all"
        )
        assert restored.returncode == 0, restored.stderr
        runs.append(json.loads(restored.stdout.strip().splitlines()[-1]))
    total = sum(f[1] for f in files)
    assert runs[0]["inserted"] == total and runs[1]["inserted"] == 0 and runs[1]["skipped"] == total
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        assert conn.execute(f'SELECT * FROM "Task" WHERE {PREDICATE} ORDER BY id').fetchall() == removed
        assert scalar(conn, """SELECT count(*) FROM "Message" """) == messages + total - expected[0]


@pytest.fixture(scope="module")
def locked_s3(workdir: Path) -> Iterator[localenv.S3Server]:
    """A moto server that checks credentials and permissions (after the requests that set it up)."""
    server = localenv.S3Server(workdir / "locked", authenticated_after=7)
    try:
        yield server.start()
    finally:
        server.stop()


def test_a_bucket_that_cannot_take_files_stalls_naming_the_field(
    operator: Any,
    kubectl: Kubectl,
    postgres: Any,
    database: str,
    app_secret: str,
    locked_s3: Any,
) -> None:
    s3_client(locked_s3.endpoint, "us-east-1", "setup", "setup", True).create_bucket(Bucket="locked")
    reader = s3_user(locked_s3.endpoint, "reader", ["s3:GetObject"])
    writer = s3_user(locked_s3.endpoint, "writer", ["s3:*"])
    kubectl.secret("writer", writer)
    kubectl.secret("reader", reader)
    kubectl.secret("wrong", {"AWS_ACCESS_KEY_ID": "AKIAWRONGWRONGWRONG", "AWS_SECRET_ACCESS_KEY": "nope"})
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_tasks(conn, 600)
        before = scalar(conn, 'SELECT count(*) FROM "Task"')
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        cases = {
            "unreachable": (
                policy("unreachable", "locked", f"http://127.0.0.1:{localenv.free_port()}", "reader"),
                "DestinationUnreachable",
                "spec.export.destination.s3.endpoint",
            ),
            "wrong-keys": (
                policy("wrong-keys", "locked", locked_s3.endpoint, "wrong"),
                "CredentialsRejected",
                "spec.export.destination.s3.credentialsSecretRef",
            ),
            "read-only": (
                policy("read-only", "locked", locked_s3.endpoint, "reader"),
                "DestinationNotWritable",
                "spec.export.destination.s3.credentialsSecretRef",
            ),
            "no-bucket": (
                policy("no-bucket", "missing", locked_s3.endpoint, "writer"),
                "BucketNotFound",
                "spec.export.destination.s3.bucket",
            ),
            "works": (policy("works", "locked", locked_s3.endpoint, "writer"), "", ""),
        }
        for obj, _, _ in cases.values():
            kubectl.apply(obj)
        kubectl.wait("retentionpolicy", "works", "Ready", timeout=120)  # the same bucket, with keys that may write
        del cases["works"]
        for name, (_, reason, field) in cases.items():
            kubectl.wait("retentionpolicy", name, "Stalled", timeout=120)
            stalled = next(c for c in kubectl.get("rp", name)["status"]["conditions"] if c["type"] == "Stalled")
            assert stalled["message"].startswith(field) and stalled["reason"] == reason, stalled
            assert reader["AWS_SECRET_ACCESS_KEY"] not in stalled["message"]
        # No CronJob was made for them, and no row moved.
        assert kubectl.run("get", "cronjobs", "-o", "name").split() == ["cronjob.batch/works-retention"]
        assert scalar(conn, 'SELECT count(*) FROM "Task"') == before
