"""FileMigration end to end: the operator runs a Job per phase; the Job's pod command,
run for real with the Secrets the kubelet would inject, moves the files to the S3
server; status follows the ledger; the data column is gone only at the end."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import time
import uuid
from typing import Any

import psycopg
import pytest

from conftest import ROOT, Kubectl, load_example, run_container, scalar
from pgscale.storage import s3_client

pytestmark = [pytest.mark.cluster, pytest.mark.postgres, pytest.mark.s3]


def secrets(kubectl: Kubectl, *names: str) -> dict[str, dict[str, str]]:
    return {n: {k: base64.b64decode(v).decode() for k, v in kubectl.get("secret", n)["data"].items()} for n in names}


def wait_for(kubectl: Kubectl, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get("filemigration", "files-to-s3")
        if check(obj.get("status") or {}):
            return obj
        time.sleep(0.5)
    raise AssertionError(json.dumps(obj.get("status"), indent=1))


def run_job(kubectl: Kubectl, name: str) -> dict[str, Any]:
    job = kubectl.get("job", name)
    pod = job["spec"]["template"]["spec"]
    result = run_container(pod, secrets(kubectl, "app-db", "s3-credentials"))
    assert result.returncode == 0, result.stderr + result.stdout
    kubectl.run("annotate", "fm", "files-to-s3", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def test_three_phases_through_the_operator(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str, s3_server: Any
) -> None:
    bucket = f"app-files-{uuid.uuid4().hex[:6]}"
    s3 = s3_client(s3_server.endpoint, "us-east-1", s3_server.ACCESS_KEY, s3_server.SECRET_KEY, True)
    s3.create_bucket(Bucket=bucket)
    kubectl.secret(
        "s3-credentials", {"AWS_ACCESS_KEY_ID": s3_server.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3_server.SECRET_KEY}
    )
    originals = {}
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        for i in range(30):
            payload = random.Random(i).randbytes(random.Random(i).randint(1, 100_000))
            originals[f"file-{i}"] = payload
            conn.execute(
                'INSERT INTO "File" (id, "fileName", size, data) VALUES (%s, %s, %s, %s)',
                (f"file-{i}", f"f{i}.bin", len(payload), base64.b64encode(payload).decode()),
            )
        kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
        fm = load_example("filemigration.yaml")[0]
        fm["spec"]["destination"]["s3"].update(bucket=bucket, endpoint=s3_server.endpoint)
        fm["spec"]["phase"] = "copy"
        kubectl.apply(fm)
        obj = wait_for(kubectl, lambda s: s.get("jobName") and s.get("phase") == "Copying")
        job = kubectl.get("job", obj["status"]["jobName"])
        env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
        creds = {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"] == creds
        assert job["metadata"]["ownerReferences"][0]["name"] == "files-to-s3"
        report = run_job(kubectl, obj["status"]["jobName"])
        assert report["rows_migrated"] == 30
        kubectl.wait("filemigration", "files-to-s3", "Ready")
        obj = kubectl.get("filemigration", "files-to-s3")
        assert obj["status"]["phase"] == "Completed" and obj["status"]["rowsMigrated"] == 30
        assert obj["status"]["progress"] == "100.0%"
        for key, payload in originals.items():
            body = s3.get_object(Bucket=bucket, Key=f"files/File/{key}")["Body"].read()
            assert hashlib.sha256(body).hexdigest() == hashlib.sha256(payload).hexdigest()
        assert scalar(conn, """SELECT count(*) FROM information_schema.columns WHERE column_name = 'filePath'""") == 0

        for phase in ("cutover", "dropSource"):
            kubectl.run("patch", "fm", "files-to-s3", "--type=merge", "-p", json.dumps({"spec": {"phase": phase}}))
            generation = kubectl.get("fm", "files-to-s3")["metadata"]["generation"]
            obj = wait_for(
                kubectl,
                lambda s, g=generation: f"-files-{g}-" in (s.get("jobName") or "") and s.get("observedGeneration") == g,
            )
            assert (
                scalar(
                    conn,
                    """SELECT count(*) FROM information_schema.columns
                                   WHERE table_name = 'File' AND column_name = 'data'""",
                )
                == 1
            )
            run_job(kubectl, obj["status"]["jobName"])
            kubectl.wait("filemigration", "files-to-s3", "Ready")
        rows = conn.execute('SELECT id, "filePath", "storageType" FROM "File"').fetchall()
        assert all(path == f"files/File/{key}" and kind == "s3" for key, path, kind in rows)
        assert (
            scalar(
                conn,
                """SELECT count(*) FROM information_schema.columns
                               WHERE table_name = 'File' AND column_name = 'data'""",
            )
            == 0
        )
    table = kubectl.run("get", "fm")
    assert "Completed" in table and "100.0%" in table
    events = {e["reason"] for e in json.loads(kubectl.run("get", "events", "-o", "json"))["items"]}
    assert {"JobStarted", "PhaseCopying", "PhaseCompleted"} <= events
