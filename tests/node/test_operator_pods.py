"""pgscale in real pods: the chart's operator, its Jobs and CronJobs, the pooler and the replicas.

Everything here runs in containers on the harness's node (hack/node.py) from images built on
this machine (hack/images.py): the operator installed by `helm install` runs as its
ServiceAccount and reaches Postgres and the S3 server on the host side of the node's link
(198.18.0.1), the way pods reach a database outside the cluster. Nothing plays the kubelet.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import images
import localenv
import psycopg
import pytest
import yaml

from conftest import ROOT, Kubectl, load_example, wait_until

pytestmark = [pytest.mark.node, pytest.mark.cluster, pytest.mark.postgres]


@pytest.fixture(scope="module")
def app(
    node_control_plane: localenv.ControlPlane,
    node_postgres: localenv.Postgres,
    node_s3: localenv.S3Server,
    operator_release: Kubectl,
) -> Iterator[Kubectl]:
    """A namespace with the strategy's sample application in database `app` (the demo's data), its
    connection Secret naming HOST_IP, S3 credentials and the examples' bucket. The tests below share
    it in order: the examples first, then what builds on them."""
    sys.path.insert(0, str(ROOT / "hack"))
    import demo

    from pgscale.storage import s3_client

    cp = node_control_plane
    name = f"app-{uuid.uuid4().hex[:6]}"
    cp.kubectl_run("create", "namespace", name, check=True)
    k = Kubectl(cp, name)
    node_postgres.execute('DROP DATABASE IF EXISTS "app" WITH (FORCE)')
    demo.load_sample(node_postgres)
    k.secret("app-db", {"uri": node_postgres.uri("app")})
    k.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": node_s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": node_s3.SECRET_KEY})
    s3 = s3_client(node_s3.endpoint, "us-east-1", node_s3.ACCESS_KEY, node_s3.SECRET_KEY, True)
    if "app-files" not in [b["Name"] for b in s3.list_buckets().get("Buckets", [])]:
        s3.create_bucket(Bucket="app-files")
    wait_until(
        lambda: cp.kubectl_run("-n", name, "get", "sa", "default").returncode == 0,
        timeout=30,
        what="default ServiceAccount",
    )
    yield k
    cp.kubectl_run(
        "delete",
        "databaseprofiles,partitionpolicies,retentionpolicies,filemigrations",
        "--all",
        "-n",
        name,
        "--wait=true",
        "--timeout=60s",
    )
    cp.kubectl_run("delete", "namespace", name, "--wait=false")


def pods(kubectl: Kubectl, selector: str) -> list[dict[str, Any]]:
    return list(json.loads(kubectl.run("get", "pods", "-l", selector, "-o", "json"))["items"])


def pod_story(k: Kubectl, selector: str) -> str:
    """Each pod's phase, container states and last log lines: a failing test shows the pod's own error."""
    out = []
    for pod in pods(k, selector):
        name = pod["metadata"]["name"]
        states = json.dumps([c.get("state") for c in pod.get("status", {}).get("containerStatuses", [])])
        log = k.run("logs", name, "--tail=15", check=False) or k.run("logs", name, "-p", "--tail=15", check=False)
        out.append(f"--- {name} {pod.get('status', {}).get('phase')} {states}\n{log}")
    return "\n".join(out) or f"no pods match {selector}"


def wait_ready(k: Kubectl, kind: str, name: str, selector: str, want: int, timeout: float = 300) -> None:
    """Until the workload has `want` ready replicas; on timeout, fail with its pods' story."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = k.cp.kubectl_run("-n", k.namespace, "get", kind, name, "-o", "jsonpath={.status.readyReplicas}")
        if got.returncode == 0 and got.stdout.strip() == str(want):
            return
        time.sleep(2)
    raise AssertionError(f"{kind}/{name}: not {want} ready after {timeout}s\n{pod_story(k, selector)}")


def ready(pod: dict[str, Any]) -> bool:
    conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
    return pod.get("status", {}).get("phase") == "Running" and conds.get("Ready") == "True"


def exec_in(kubectl: Kubectl, pod: str, *cmd: str, check: bool = False) -> tuple[int, str]:
    result = kubectl.cp.kubectl_run("-n", kubectl.namespace, "exec", pod, "--", *cmd)
    if check:
        assert result.returncode == 0, f"exec {cmd} in {pod}: {result.stderr}"
    return result.returncode, (result.stdout + result.stderr)


def test_operator_pod_runs_hardened(operator_release: Kubectl) -> None:
    """The chart's pods run the image built from the Dockerfile as 65532, read-only, without
    capabilities; one holds the Lease, and neither restarts (a pod that crash-loops can look Running)."""
    k = operator_release
    lease = wait_until(
        lambda: k.cp.kubectl_run("-n", k.namespace, "get", "lease", "pgscale", "-o", "json").stdout,
        timeout=120,
        what="the operator to take its Lease",
    )
    holder = json.loads(lease)["spec"]["holderIdentity"]
    time.sleep(20)  # longer than a start that fails
    running = [p for p in pods(k, "app.kubernetes.io/name=pgscale") if ready(p)]
    assert len(running) == 2, k.run("get", "pods", "-o", "wide")
    assert holder in {p["metadata"]["name"] for p in running}
    for p in running:
        assert p["status"]["containerStatuses"][0]["restartCount"] == 0, k.run(
            "logs", p["metadata"]["name"], "-p", check=False
        )
    pod = running[0]
    name = pod["metadata"]["name"]
    status = pod["status"]["containerStatuses"][0]
    assert status["restartCount"] == 0, status
    # The chart's image name; containerd may report the image's other name (pgscale:<version>, same digest).
    assert pod["spec"]["containers"][0]["image"] == "ghcr.io/pgscale/pgscale:0.1.0"
    assert status["image"] in {images.normalize(n) for n in images.operator_names()}, status["image"]
    _, ids = exec_in(k, name, "python", "-c", "import os; print(os.getuid(), os.getgid())", check=True)
    assert ids.split() == ["65532", "65532"], ids
    code, out = exec_in(k, name, "python", "-c", "open('/probe', 'w')")
    assert code != 0 and "Read-only file system" in out, out
    _, caps = exec_in(k, name, "python", "-c", "print(open('/proc/self/status').read())", check=True)
    eff = next(line.split()[1] for line in caps.splitlines() if line.startswith("CapEff:"))
    assert int(eff, 16) == 0, caps
    _, listing = exec_in(k, name, "python", "-c", "open('/tmp/ok', 'w').write('x'); print('tmp writable')", check=True)
    assert "tmp writable" in listing


def test_examples_become_ready_with_jobs_in_pods(
    operator_release: Kubectl, app: Kubectl, node_postgres: localenv.Postgres, node_s3: localenv.S3Server
) -> None:
    """Every example applied as a user would; the conversion runs in the operator's pod, the file
    migration's Job in a pod of its own; nobody plays the kubelet."""
    for name in ("databaseprofile.yaml", "partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"):
        docs = load_example(name)
        for doc in docs:
            if doc["kind"] == "FileMigration":
                doc["spec"]["destination"]["s3"]["endpoint"] = node_s3.endpoint
        app.run("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    for kind in ("databaseprofile", "partitionpolicy", "retentionpolicy", "filemigration"):
        app.run("wait", "--for=condition=Ready", kind, "--all", "--timeout=300s")
    fm = app.get("filemigration", "files-to-s3")
    # Ready comes from the ledger the Job writes; the pod exits right after its last row.
    app.wait("job", fm["status"]["jobName"], "Complete", timeout=120)
    job_pods = pods(app, f"job-name={fm['status']['jobName']}")
    assert job_pods and job_pods[0]["status"]["phase"] == "Succeeded"
    assert job_pods[0]["spec"]["containers"][0]["image"] == "ghcr.io/pgscale/pgscale:0.1.0"
    with psycopg.connect(node_postgres.dsn("app"), autocommit=True) as conn:
        moved = conn.execute("""SELECT count(*) FROM "File" WHERE "storageType" = 's3'""").fetchone()
        parts = conn.execute("""SELECT count(*) FROM pg_inherits WHERE inhparent = '"Task"'::regclass""").fetchone()
    assert moved and moved[0] == 50
    assert parts and parts[0] > 12


def _minute_ahead(seconds: int = 75) -> str:
    """A cron schedule firing once, at the first whole minute at least `seconds` from now (UTC)."""
    at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=seconds)
    at = at.replace(second=0, microsecond=0) + dt.timedelta(minutes=1)
    return f"{at.minute} {at.hour} {at.day} {at.month} *"


def test_cronjobs_fire_and_their_pods_do_the_work(
    operator_release: Kubectl, app: Kubectl, node_postgres: localenv.Postgres
) -> None:
    """A RetentionPolicy and a PartitionPolicy maintenance CronJob scheduled a minute ahead fire on
    their own; their pods (the operator's image, the policy's Secret) move the rows."""
    with psycopg.connect(node_postgres.dsn("app"), autocommit=True) as conn:
        before = conn.execute("""SELECT count(*) FROM "Task" WHERE status = 'COMPLETED'
                                 AND "completedAt" < now() - interval '90 days'""").fetchone()
    assert before and before[0] > 0
    schedule = _minute_ahead()
    rp = load_example("retentionpolicy.yaml")[0]
    rp["metadata"]["name"] = "archive-on-schedule"
    rp["spec"]["schedule"] = schedule
    rp["spec"]["archive"]["table"] = "Task_archive_cron"
    rp["spec"]["children"] = {
        "mode": "archive",
        "tables": [{"name": "Message", "mode": "archive", "archiveTable": "Message_archive_cron"}],
    }
    app.apply(rp)
    pp = app.get("partitionpolicy", "task-by-month")
    app.run(
        "patch",
        "partitionpolicy",
        "task-by-month",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"maintenance": {"cronJob": True, "schedule": schedule}}}),
    )
    assert pp
    app.wait("retentionpolicy", "archive-on-schedule", "Ready", timeout=60)

    def completed(label: str) -> list[dict[str, Any]]:
        jobs = json.loads(app.run("get", "jobs", "-l", label, "-o", "json"))["items"]
        return [j for j in jobs if j.get("status", {}).get("succeeded")]

    wait_until(
        lambda: completed("pgscale.io/retentionpolicy=archive-on-schedule"),
        timeout=240,
        what="the retention CronJob's Job to complete",
    )
    wait_until(
        lambda: completed("pgscale.io/partitionpolicy=task-by-month"),
        timeout=120,
        what="the maintenance CronJob's Job to complete",
    )
    with psycopg.connect(node_postgres.dsn("app"), autocommit=True) as conn:
        archived = conn.execute('SELECT count(*) FROM "Task_archive_cron"').fetchone()
        left = conn.execute("""SELECT count(*) FROM "Task" WHERE status = 'COMPLETED'
                               AND "completedAt" < now() - interval '90 days'""").fetchone()
    assert archived and archived[0] > 0 and left and left[0] == 0


def test_pooler_and_replicas_serve_pods(
    operator_release: Kubectl, app: Kubectl, node_postgres: localenv.Postgres
) -> None:
    """An application pod reaches the database through the `-pooler-rw` Service; two replicas clone
    the primary, stream from it and answer on `-ro`; scaling to one drops the second slot."""
    node_postgres.execute(
        "DO $$ BEGIN CREATE ROLE pgscale_repl REPLICATION LOGIN PASSWORD 'repl-secret'; "
        "EXCEPTION WHEN duplicate_object THEN NULL; END $$"
    )
    app.secret("replication", {"username": "pgscale_repl", "password": "repl-secret"})
    profile = load_example("databaseprofile.yaml")[0]
    profile["metadata"]["name"] = "pooled"
    profile["spec"]["parameters"] = {}
    profile["spec"]["pooling"] = {"instances": 1, "readReplicas": True}
    profile["spec"]["readReplicas"] = {
        "instances": 2,
        "replicationSecretRef": {"name": "replication"},
        "storage": {"size": "1Gi"},
    }
    app.apply(profile)
    app.wait("databaseprofile", "pooled", "Ready", timeout=300)
    wait_ready(app, "statefulset", "pooled-replica", "pgscale.io/role=replica", 2)
    wait_ready(app, "deployment", "pooled-pooler-rw", "pgscale.io/databaseprofile=pooled", 1)

    def streaming() -> int:
        with psycopg.connect(node_postgres.dsn("app"), autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'").fetchone()
        return int(row[0]) if row else 0

    wait_until(lambda: streaming() == 2, timeout=120, what="two replicas streaming")
    secret = node_postgres.PASSWORD
    script = (
        f"PGPASSWORD={secret} psql -At -h pooled-pooler-rw -U postgres app -c 'SELECT count(*) FROM \"Task\"' && "
        f"PGPASSWORD={secret} psql -At -h pooled-ro -U postgres app -c 'SELECT pg_is_in_recovery()'"
    )
    out = run_pod(app, "client", "postgres:15", ["sh", "-c", script])
    lines = out.split()
    assert lines[-1] == "t", out
    assert int(lines[-2]) > 0, out
    app.run(
        "patch",
        "databaseprofile",
        "pooled",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"readReplicas": {"instances": 1}}}),
    )

    def slots() -> list[str]:
        with psycopg.connect(node_postgres.dsn("app"), autocommit=True) as conn:
            return [r[0] for r in conn.execute("SELECT slot_name FROM pg_replication_slots ORDER BY 1")]

    wait_until(
        lambda: len([s for s in slots() if s.endswith("_1")]) == 0 and streaming() == 1,
        timeout=180,
        what="the second replica's slot dropped",
    )


def run_pod(k: Kubectl, name: str, image: str, command: list[str], timeout: float = 120) -> str:
    """Run a one-shot pod to completion and return its log (fails with the log when it fails)."""
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": name, "image": image, "command": command, "imagePullPolicy": "Never"}],
        },
    }
    k.apply(pod)
    phase = wait_until(
        lambda: (
            k.get("pod", name).get("status", {}).get("phase") in ("Succeeded", "Failed")
            and k.get("pod", name)["status"]["phase"]
        ),
        timeout=timeout,
        what=f"pod {name} to finish",
    )
    log = k.run("logs", name)
    assert phase == "Succeeded", log
    k.run("delete", "pod", name, "--wait=false")
    return log


def test_operator_pod_deleted_mid_work(
    operator_release: Kubectl, app: Kubectl, node_postgres: localenv.Postgres
) -> None:
    """Deleting the leading operator pod during a conversion: the standby (or the Deployment's new
    pod) takes over and the conversion finishes with every row."""
    node_postgres.execute('CREATE DATABASE "big"')
    with psycopg.connect(node_postgres.dsn("big"), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        conn.execute("""INSERT INTO "Task" (title, status, "createdAt") SELECT 'task ' || g, 'PENDING',
                        now() - (g || ' minutes')::interval FROM generate_series(1, 300000) g""")
        expected = conn.execute('SELECT count(*), sum(hashtext(title)) FROM "Task"').fetchone()
    app.secret("big-db", {"uri": node_postgres.uri("big")})
    profile = load_example("databaseprofile.yaml")[0]
    profile["metadata"]["name"] = "big"
    profile["spec"]["connection"]["secretRef"]["name"] = "big-db"
    profile["spec"]["parameters"] = {}
    app.apply(profile)
    policy = load_example("partitionpolicy.yaml")[0]
    policy["metadata"]["name"] = "big-by-month"
    policy["spec"]["profileRef"]["name"] = "big"
    policy["spec"]["conversion"]["batchSize"] = 2000
    app.apply(policy)
    wait_until(
        lambda: (
            (
                (app.get("partitionpolicy", "big-by-month").get("status", {}).get("conversion") or {}).get("rowsDone")
                or 0
            )
            > 0
        ),
        timeout=180,
        what="the conversion to copy rows",
    )
    lease = json.loads(operator_release.run("get", "lease", "pgscale", "-o", "json"))
    leader = lease["spec"]["holderIdentity"]
    operator_release.run("delete", "pod", leader, "--wait=false")
    app.wait("partitionpolicy", "big-by-month", "Ready", timeout=600)
    with psycopg.connect(node_postgres.dsn("big"), autocommit=True) as conn:
        got = conn.execute('SELECT count(*), sum(hashtext(title)) FROM "Task"').fetchone()
        partitioned = conn.execute("""SELECT relkind FROM pg_class WHERE relname = 'Task'""").fetchone()
    assert got == expected
    assert partitioned and partitioned[0] == "p"
    operator_release.run("rollout", "status", "deployment/pgscale", "--timeout=180s")
    new = json.loads(operator_release.run("get", "lease", "pgscale", "-o", "json"))["spec"]["holderIdentity"]
    assert new != leader
