"""pgscale in real pods: the chart's operator, its Jobs and CronJobs, the pooler and the replicas.

Everything here runs in containers on the harness's node (hack/node.py) from images built on
this machine (hack/images.py): the operator installed by `helm install` runs as its
ServiceAccount and reaches Postgres and the S3 server on the host side of the node's link
(198.18.0.1), the way pods reach a database outside the cluster. Nothing plays the kubelet.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import random
import subprocess
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
from pgscale import api
from pgscale.controllers.filemigration import job_state

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
        ",".join(kind.plural for kind in api.KINDS),
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


def operator_story(k: Kubectl) -> str:
    """The Lease and the operator pods' last log lines."""
    lease = k.run("get", "lease", "pgscale", "-o", "jsonpath={.spec}", check=False)
    return f"Lease: {lease}\n{pod_story(k, 'app.kubernetes.io/name=pgscale')}"


def wait_ready(k: Kubectl, kind: str, name: str, selector: str, want: int, timeout: float = 300) -> None:
    """Until the workload has `want` ready replicas; on timeout, fail with its pods' story."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = k.cp.kubectl_run("-n", k.namespace, "get", kind, name, "-o", "jsonpath={.status.readyReplicas}")
        if got.returncode == 0 and got.stdout.strip() == str(want):
            return
        time.sleep(2)
    raise AssertionError(f"{kind}/{name}: not {want} ready after {timeout}s\n{pod_story(k, selector)}")


def wait_all_ready(k: Kubectl, kind: str, operator: Kubectl, timeout: float = 300) -> None:
    """Until every object of a kind is Ready; on timeout, fail with their conditions and the stories of
    the pods pgscale made in the namespace (a broken pod spec shows as the pod's own error) and of the
    operator."""
    deadline = time.monotonic() + timeout
    items: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        items = json.loads(k.run("get", kind, "-o", "json"))["items"]
        conds = [{c["type"]: c for c in (o.get("status") or {}).get("conditions") or []} for o in items]
        if items and all((c.get("Ready") or {}).get("status") == "True" for c in conds):
            return
        time.sleep(2)
    states = {o["metadata"]["name"]: (o.get("status") or {}).get("conditions") for o in items}
    raise AssertionError(
        f"{kind}: not all Ready after {timeout}s: {json.dumps(states)[:2000]}\n"
        f"{pod_story(k, 'app.kubernetes.io/managed-by=pgscale')}\n{operator_story(operator)}"
    )


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
        wait_all_ready(app, kind, operator_release)
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
    # kube-proxy programs a Service a moment after its endpoints are ready: each query retries for 30 s.
    script = (
        'q() { for i in $(seq 30); do psql -At -h "$1" -U postgres app -c "$2" && return 0; sleep 1; done; '
        f"return 1; }}; export PGPASSWORD={secret}; "
        """q pooled-pooler-rw 'SELECT count(*) FROM "Task"' && q pooled-ro 'SELECT pg_is_in_recovery()'"""
    )
    out = run_pod(app, "client", "postgres:15", ["sh", "-c", script])
    lines = [line.strip() for line in out.splitlines()]  # a retried query's errors are in the log too
    assert lines[-1] == "t", out
    counts = [line for line in lines if line.isdigit()]
    assert counts and int(counts[-1]) > 0, out
    # What `kubectl get pods -A` shows with everything up (printed for the record: run with -s to see it).
    columns = "NAMESPACE:.metadata.namespace,NAME:.metadata.name,STATUS:.status.phase,IMAGE:.spec.containers[0].image"
    print("\n" + app.cp.kubectl_run("get", "pods", "-A", "-o", f"custom-columns={columns}").stdout)
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

    deadline = time.monotonic() + 300
    while not (len([s for s in slots() if s.endswith("_1")]) == 0 and streaming() == 1):
        if time.monotonic() > deadline:
            profile_status = json.dumps(app.get("databaseprofile", "pooled").get("status", {}).get("conditions"))
            raise AssertionError(
                f"slots {slots()}, {streaming()} streaming after scaling to 1; conditions {profile_status}\n"
                f"{pod_story(app, 'pgscale.io/role=replica')}\n{operator_story(operator_release)}"
            )
        time.sleep(2)


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

    def holder() -> str | None:
        spec = json.loads(operator_release.run("get", "lease", "pgscale", "-o", "json"))["spec"]
        return spec.get("holderIdentity") if spec.get("holderIdentity") != leader else None

    # A released Lease has no holder until a standby takes it (within its retry period).
    wait_until(holder, timeout=60, what=f"a new holder of the Lease (was {leader})")


FILES = 1500  # rows of the file migration below; every 250th holds a file of 1-3 MB, the others 1-40 KB


def _file(i: int) -> bytes:
    rng = random.Random(i)
    return rng.randbytes(rng.randint(1_000_000, 3_000_000) if i % 250 == 0 else rng.randint(1_000, 40_000))


def test_file_migration_survives_its_pods_deleted(
    operator_release: Kubectl, app: Kubectl, node_postgres: localenv.Postgres, node_s3: localenv.S3Server
) -> None:
    """A FileMigration copying in its Job's pod: the leading operator pod is deleted, then the Job's pod
    itself; the Deployment, the Job controller and the operator bring the work back and it finishes
    with every file in S3, byte for byte, once, and no InternalError on the way."""
    from pgscale.storage import s3_client

    started = time.monotonic()
    timeline: list[str] = []

    def note(what: str) -> None:
        timeline.append(f"{time.monotonic() - started:6.1f}s {what}")

    digests: dict[str, str] = {}
    sizes: dict[str, int] = {}
    node_postgres.execute('DROP DATABASE IF EXISTS "files" WITH (FORCE)')
    node_postgres.execute('CREATE DATABASE "files"')
    with psycopg.connect(node_postgres.dsn("files"), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        with conn.cursor().copy('COPY "File" (id, "fileName", size, data) FROM STDIN') as copy:
            for i in range(FILES):
                payload, key = _file(i), f"file-{i:05d}"
                digests[key], sizes[key] = hashlib.sha256(payload).hexdigest(), len(payload)
                copy.write_row((key, f"f{i}.bin", len(payload), base64.b64encode(payload).decode()))
    note(f"seeded {FILES} rows, {sum(sizes.values()) / 2**20:.1f} MiB of files")
    bucket = f"moved-{uuid.uuid4().hex[:6]}"
    s3 = s3_client(node_s3.endpoint, "us-east-1", node_s3.ACCESS_KEY, node_s3.SECRET_KEY, True)
    s3.create_bucket(Bucket=bucket)
    app.secret("files-db", {"uri": node_postgres.uri("files")})
    profile = load_example("databaseprofile.yaml")[0]
    profile["metadata"]["name"] = "files"
    profile["spec"]["connection"]["secretRef"]["name"] = "files-db"
    profile["spec"]["parameters"] = {}
    app.apply(profile)
    fm = load_example("filemigration.yaml")[0]
    fm["metadata"]["name"] = "files-moved"
    fm["spec"]["profileRef"]["name"] = "files"
    fm["spec"]["destination"]["s3"].update(bucket=bucket, endpoint=node_s3.endpoint, prefix="moved/")
    fm["spec"]["rateLimit"] = {"rowsPerSecond": 30}  # ~50 s of copying: time to delete pods under it
    app.apply(fm)

    seen: set[str] = set()
    job_pods: dict[str, dict[str, Any]] = {}  # every pod of the migration's Jobs, as last seen
    live: set[str] = set()  # those there now

    def look() -> dict[str, Any]:
        """The FileMigration (an InternalError fails at once) and the Job pods as they are now."""
        obj = app.get("filemigration", "files-moved")
        for c in (obj.get("status") or {}).get("conditions") or []:
            seen.add(f"{c['type']}={c['status']}/{c.get('reason')}")
            assert c.get("reason") != "InternalError", f"{c}\n{operator_story(operator_release)}"
        now = pods(app, "pgscale.io/filemigration=files-moved")
        job_pods.update({pod["metadata"]["name"]: pod for pod in now})
        live.clear()
        live.update(pod["metadata"]["name"] for pod in now)
        return obj

    def ledger() -> int:
        with psycopg.connect(node_postgres.dsn("files"), autocommit=True) as conn:
            if not conn.execute("SELECT to_regclass('pgscale.file_ledger')").fetchone()[0]:  # type: ignore[index]
                return 0
            row = conn.execute("SELECT count(*) FROM pgscale.file_ledger WHERE status <> 'failed'").fetchone()
        return int(row[0]) if row else 0

    def running_pod() -> str | None:
        look()
        up = [job_pods[n] for n in live if ready(job_pods[n]) and not job_pods[n]["metadata"].get("deletionTimestamp")]
        return up[0]["metadata"]["name"] if up else None

    def migrated() -> int:
        return int((look().get("status") or {}).get("rowsMigrated") or 0)

    # 1. The copy runs in its pod and the status shows it: delete the leading operator pod.
    first = wait_until(lambda: migrated() > 0 and running_pod(), timeout=180, what="the copy to show progress")
    lease = json.loads(operator_release.run("get", "lease", "pgscale", "-o", "json"))
    leader = lease["spec"]["holderIdentity"]
    at_leader = ledger()
    operator_release.run("delete", "pod", leader, "--wait=false")
    note(f"deleted operator pod {leader} (leader); Job pod {first} running, {at_leader} rows in the ledger")

    # 2. Another pod takes the Lease and the status moves on under it.
    def new_holder() -> str | None:
        spec = json.loads(operator_release.run("get", "lease", "pgscale", "-o", "json"))["spec"]
        holder = spec.get("holderIdentity")
        return holder if holder and holder != leader else None

    holder = wait_until(new_holder, timeout=120, what=f"a new holder of the Lease (was {leader})")
    note(f"{holder} holds the Lease")
    took_over = ledger()
    wait_until(lambda: migrated() > took_over, timeout=120, what="the new leader to report progress")
    note(f"status moved on under the new leader: rowsMigrated > {took_over}")

    # 3. Delete the Job's pod mid-copy. SIGTERM: it finishes its rows in flight, prints its report and
    # exits 0. The Job controller then either sees it Succeeded (the Job completes and the operator
    # starts the next attempt) or, if it syncs while the pod still terminates, counts it as failed
    # and makes a new pod of the same Job. Either way another pod resumes where it stopped.
    victim = running_pod()
    assert victim
    cp = app.cp
    follow = subprocess.Popen(  # the pod's whole log, to its last line: the report it prints on SIGTERM
        [str(cp.kubectl), f"--kubeconfig={cp.kubeconfig}", "-n", app.namespace, "logs", "-f", victim],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1)  # kubectl attached
    at_victim = ledger()
    assert at_victim < FILES, f"the copy ended before its pod could be deleted ({at_victim} rows)"
    app.run("delete", "pod", victim, "--wait=false")
    note(f"deleted Job pod {victim}, {at_victim}/{FILES} rows in the ledger")
    try:
        out, _ = follow.communicate(timeout=120)
    finally:
        follow.kill()
    # The report is the last JSON line; a progress line (stderr) may come after it.
    report = next((line for line in reversed(out.splitlines()) if '"outcome"' in line), "")
    note(f"pod {victim} exited; its last line: {report[:400]}")
    assert '"outcome": "Succeeded"' in report, f"the deleted pod's log ends with: {out[-2000:]}"

    # 4. Another pod carries on and the migration finishes.
    deadline = time.monotonic() + 400
    successor = None
    obj = look()
    while not (
        any(c["type"] == "Ready" and c["status"] == "True" for c in obj.get("status", {}).get("conditions") or [])
        and obj["status"].get("observedGeneration") == obj["metadata"]["generation"]
    ):
        assert time.monotonic() < deadline, (
            f"not Ready: {json.dumps(obj.get('status'))}\n{pod_story(app, 'pgscale.io/filemigration=files-moved')}"
        )
        if successor is None and (successor := running_pod()):
            note(f"pod {successor} of Job {job_pods[successor]['metadata']['labels']['job-name']} running")
        time.sleep(1)
        obj = look()
    note(f"Ready: {obj['status'].get('phase')}, {obj['status'].get('rowsMigrated')} rows")
    status = obj["status"]
    # Ready comes from the ledger; the last pod exits after a pass that finds nothing left.
    selector = "pgscale.io/filemigration=files-moved"

    def jobs_finished() -> list[dict[str, Any]]:
        jobs = json.loads(app.run("get", "jobs", "-l", selector, "-o", "json"))["items"]
        done = all(job_state(j) != "active" for j in jobs)
        return jobs if done else []

    jobs = wait_until(jobs_finished, timeout=120, what="the migration's Jobs to finish")
    note("Jobs finished")
    look()
    for job in jobs:
        s = job.get("status", {})
        conds = [c["type"] for c in s.get("conditions") or [] if c["status"] == "True"]
        note(f"Job {job['metadata']['name']}: succeeded {s.get('succeeded')}, failed {s.get('failed')}, {conds}")
    for name, pod in job_pods.items():
        states = [c.get("state") for c in pod.get("status", {}).get("containerStatuses") or []]
        gone = "" if name in live else " (deleted; as last seen)"
        note(f"pod {name}{gone}: {pod.get('status', {}).get('phase')} {json.dumps(states)[:200]}")
    events = json.loads(app.run("get", "events", "--field-selector", "involvedObject.name=files-moved", "-o", "json"))
    reasons = sorted(f"{e['reason']}x{e.get('count') or 1}" for e in events["items"])
    print(
        "\nfile migration with its pods deleted:\n"
        + "\n".join(timeline)
        + f"\nconditions seen: {sorted(seen)}\nevents: {reasons}"
    )
    assert all(job_state(j) == "succeeded" for j in jobs), "no Job failed"
    left = pods(app, selector)
    assert victim not in {p["metadata"]["name"] for p in left}
    assert len(job_pods) == 2 and successor, f"one pod after the deleted one: {sorted(job_pods)}"
    assert all(p["status"]["phase"] == "Succeeded" for p in left), pod_story(app, selector)
    assert not any("InternalError" in r for r in reasons), reasons

    # Every file once, byte for byte; the rows point at them; the ledger and the status agree.
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    listed = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert sorted(listed) == sorted(f"moved/File/{k}" for k in digests), "every row exactly one object, no other"
    for key, digest in digests.items():
        body = s3.get_object(Bucket=bucket, Key=f"moved/File/{key}")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == digest, key
    with psycopg.connect(node_postgres.dsn("files"), autocommit=True) as conn:
        rows = conn.execute(
            """SELECT id, "filePath", "storageType", encode(sha256(decode(data, 'base64')), 'hex') FROM "File" """
        ).fetchall()
        entries = conn.execute("SELECT key, status, object_key, size, sha256 FROM pgscale.file_ledger").fetchall()
    assert {r[0]: (r[1], r[2], r[3]) for r in rows} == {k: (f"moved/File/{k}", "s3", d) for k, d in digests.items()}
    assert {e[0]: e[1:] for e in entries} == {k: ("cutover", f"File/{k}", sizes[k], d) for k, d in digests.items()}
    assert status["phase"] == "Completed", status
    assert (status["rowsMigrated"], status["rowsFailed"], status["rowsRemaining"]) == (FILES, 0, 0), status
    assert status["bytesMigrated"] == sum(sizes.values()), status
    # The operator's Deployment is whole again: the deleted leader replaced, nothing restarted.
    operator_release.run("rollout", "status", "deployment/pgscale", "--timeout=180s")
    ops = [p for p in pods(operator_release, "app.kubernetes.io/name=pgscale") if ready(p)]
    assert len(ops) == 2 and leader not in {p["metadata"]["name"] for p in ops}, operator_story(operator_release)
    assert all(p["status"]["containerStatuses"][0]["restartCount"] == 0 for p in ops), operator_story(operator_release)
    for p in ops:
        log = operator_release.run("logs", p["metadata"]["name"])
        assert "Traceback" not in log, log[-3000:]
