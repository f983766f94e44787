"""pgscale end to end on one machine (run through hack/demo.sh).

Starts the local environment (hack/localenv.py), loads the strategy's sample
application into a real PostgreSQL, applies every example in examples/ with
kubectl, and prints what the operator reports for each resource.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import localenv

from pgscale.storage import s3_client

ROOT = localenv.ROOT
NAMESPACE = "demo"
EXAMPLES = ["databaseprofile.yaml", "partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"]


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def load_sample(pg: localenv.Postgres) -> None:
    """The sample app with a year of tasks, some messages and Base64 files."""
    pg.execute('CREATE DATABASE "app"')
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        conn.execute(
            """INSERT INTO "Task" (title, status, "createdAt", "completedAt")
               SELECT 'task ' || g, CASE WHEN g % 3 = 0 THEN 'PENDING' ELSE 'COMPLETED' END,
                      now() - (g || ' hours')::interval,
                      CASE WHEN g % 3 = 0 THEN NULL ELSE now() - (g || ' hours')::interval + interval '1 hour' END
               FROM generate_series(1, 8760) g"""
        )
        conn.execute("""INSERT INTO "Message" ("taskId", body) SELECT (g % 8760) + 1, 'message ' || g
                        FROM generate_series(1, 20000) g""")
        with conn.cursor() as cur:
            for i in range(50):
                payload = os.urandom(1024 * (i + 1))
                cur.execute(
                    'INSERT INTO "File" (id, "fileName", "mimeType", size, data) VALUES (%s, %s, %s, %s, %s)',
                    (
                        f"file-{i:03d}",
                        f"report-{i}.bin",
                        "application/octet-stream",
                        len(payload),
                        base64.b64encode(payload).decode(),
                    ),
                )
        sizes = conn.execute(
            """SELECT relname, pg_size_pretty(pg_total_relation_size(oid)) FROM pg_class
               WHERE relname IN ('Task', 'Message', 'File') ORDER BY relname"""
        ).fetchall()
    print("loaded:", ", ".join(f"{name} {size}" for name, size in sizes))


def pod_environment(container: dict[str, Any], secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """A container's environment as the kubelet builds it (plain values and secretKeyRefs)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/")}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
            continue
        ref = entry.get("valueFrom", {}).get("secretKeyRef")
        if ref and ref["key"] in secrets.get(ref["name"], {}):
            env[entry["name"]] = secrets[ref["name"]][ref["key"]]
    return env


def play_kubelet(kubectl: Any, done: set[str]) -> None:
    """There is no kubelet here: run each new pgscale Job's container command on this machine, as a pod would."""
    jobs = json.loads(kubectl("get", "jobs", "-l", "app.kubernetes.io/managed-by=pgscale", "-o", "json"))["items"]
    for job in jobs:
        name = job["metadata"]["name"]
        if name in done:
            continue
        done.add(name)
        container = job["spec"]["template"]["spec"]["containers"][0]
        names = {
            e["valueFrom"]["secretKeyRef"]["name"]
            for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})
        }
        secrets = {
            n: {
                k: base64.b64decode(v).decode()
                for k, v in json.loads(kubectl("get", "secret", n, "-o", "json")).get("data", {}).items()
            }
            for n in names
        }
        exe = str(Path(sys.executable).parent / "pgscale")
        args = [exe, *container.get("command", [])[1:], *container["args"]]
        print(f"running Job {name} here, as its pod would: pgscale {' '.join(container['args'])}", flush=True)
        result = subprocess.run(args, env=pod_environment(container, secrets), capture_output=True, text=True)
        last = (result.stdout.strip().splitlines() or [""])[-1]
        print(f"  exit {result.returncode}: {last[:300]}", flush=True)
        owner = job["metadata"]["ownerReferences"][0]
        kubectl(
            "annotate", owner["kind"].lower(), owner["name"], f"pgscale.io/reconcile-at={time.time()}", "--overwrite"
        )


def show_database(pg: localenv.Postgres) -> None:
    """What the examples changed in the database."""
    with psycopg.connect(pg.dsn("app"), autocommit=True) as conn:
        parts = conn.execute(
            """SELECT c.relname, pg_get_expr(c.relpartbound, c.oid), c.reltuples::bigint FROM pg_inherits i
               JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = '"Task"'::regclass ORDER BY 1"""
        ).fetchall()
        print(f'"Task" is partitioned: {len(parts)} partitions, e.g.')
        for name, bound, _ in [*parts[:2], *parts[-3:]]:
            print(f"  {name:<16} {bound}")
        key = conn.execute(
            """SELECT pg_get_constraintdef(oid), (SELECT count(*) FROM "Task") FROM pg_constraint
               WHERE conname = 'Task_pkey'"""
        ).fetchone()
        print(f"  key: {key[0]}; rows: {key[1]}")  # type: ignore[index]
        # current_setting() is SHOW's text, in human units (1GB); pg_settings.setting is in the unit's
        # multiples (131072 of 8kB), which read glued to the unit as 1310728kB.
        settings = conn.execute(
            """SELECT name, current_setting(name) FROM pg_settings WHERE name IN ('work_mem', 'effective_cache_size',
               'random_page_cost', 'max_connections') ORDER BY name"""
        ).fetchall()
        print("settings now: " + ", ".join(f"{n}={v}" for n, v in settings))
        files = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE "storageType" = 's3'), min("filePath") FROM "File" """
        ).fetchone()
        print(
            f'"File": {files[1]} of {files[0]} rows point at S3 objects (e.g. {files[2]}); '  # type: ignore[index]
            "the Base64 column is kept until phase: dropSource"
        )


@contextlib.contextmanager
def on_the_node(workdir: Path) -> Iterator[tuple[localenv.ControlPlane, localenv.Postgres, localenv.S3Server]]:
    """The control plane, a real node, Postgres and the S3 server where pods reach them (HOST_IP),
    pgscale's images built here and imported, and the Helm chart installed: the operator runs in
    its pods and its Jobs in theirs."""
    import images

    import node as nodemod

    nodemod.clear_stale()
    cp = localenv.ControlPlane(workdir)
    pg = localenv.Postgres(workdir, host=nodemod.HOST_IP)
    s3 = localenv.S3Server(workdir, host=nodemod.HOST_IP)
    running: nodemod.Node | None = None
    try:
        cp.start()
        cp.kubectl_run("apply", "--server-side", "-f", str(ROOT / "crds"), check=True)
        running = nodemod.Node(workdir, cp).start()
        pg.start()
        s3.start()
        print(f"node {nodemod.NODE_NAME} Ready; building pgscale's images (cached after the first run)", flush=True)
        t = time.monotonic()
        for archive in dict.fromkeys(images.build_images().values()):
            running.import_image(archive)
        print(f"images ready in {time.monotonic() - t:.0f}s: {', '.join(running.images())}", flush=True)
        helm = subprocess.run([str(ROOT / "hack" / "build-helm.sh")], check=True, capture_output=True, text=True)
        say("helm install pgscale charts/pgscale -n pgscale-system")
        env = {**os.environ, "KUBECONFIG": str(cp.kubeconfig)}
        subprocess.run(
            [helm.stdout.split()[-1], "install", "pgscale", str(ROOT / "charts" / "pgscale"), "-n", "pgscale-system",
             "--create-namespace", "--set", "crds.install=false", "--wait", "--timeout", "300s"],
            check=True, env=env,
        )  # fmt: skip
        print(cp.kubectl_run("get", "pods", "-n", "pgscale-system", "-o", "wide", check=True).stdout)
        yield cp, pg, s3
    finally:
        if running:
            running.stop()
        s3.stop()
        pg.stop()
        cp.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", default=str(ROOT / ".tmp" / "demo"), help="working directory (state and logs)")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    parser.add_argument("--no-node", action="store_true", help="no node: run the operator and its Jobs as processes")
    args = parser.parse_args()
    import node as nodemod

    why_not = "--no-node" if args.no_node else nodemod.unsupported()
    workdir = Path(args.dir)
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    if why_not:
        say(f"starting the control plane, PostgreSQL 15, S3 server and pgscale as processes (no node: {why_not})")
        env: Any = localenv.environment(workdir)
    else:
        say("starting etcd, kube-apiserver, kube-controller-manager, a node (containerd, kubelet), PostgreSQL 15, S3")
        env = on_the_node(workdir)
    with env as (cp, pg, s3, *rest):
        op: localenv.OperatorProcess | None = rest[0] if rest else None
        print(f"up in {time.monotonic() - started:.1f}s; KUBECONFIG={cp.kubeconfig}")
        say("loading the strategy's sample application (tasks, messages, Base64 files)")
        load_sample(pg)

        def kubectl(*a: str, input: str | None = None) -> str:
            return str(cp.kubectl_run("-n", NAMESPACE, *a, input=input, check=True).stdout)

        cp.kubectl_run("create", "namespace", NAMESPACE, check=True)
        kubectl("create", "secret", "generic", "app-db", f"--from-literal=uri={pg.uri('app')}")
        kubectl(
            "create",
            "secret",
            "generic",
            "s3-credentials",
            f"--from-literal=AWS_ACCESS_KEY_ID={s3.ACCESS_KEY}",
            f"--from-literal=AWS_SECRET_ACCESS_KEY={s3.SECRET_KEY}",
        )
        say("kubectl apply -f examples/")
        for name in EXAMPLES:
            docs = [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]
            for doc in docs:
                if doc["kind"] == "FileMigration":  # point the example at the local S3 server
                    doc["spec"]["destination"]["s3"]["endpoint"] = s3.endpoint
            print(kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs)).strip())
        s3_client(s3.endpoint, "us-east-1", s3.ACCESS_KEY, s3.SECRET_KEY, True).create_bucket(Bucket="app-files")
        say(
            "waiting for every resource to be Ready"
            + (" (pgscale's Jobs run here, as their pods would)" if why_not else "")
        )
        done: set[str] = set()
        for kind in ("databaseprofile", "partitionpolicy", "retentionpolicy", "filemigration"):
            deadline = time.monotonic() + 120
            while True:
                if why_not:  # no kubelet: run each Job's command here
                    play_kubelet(kubectl, done)
                result = cp.kubectl_run("-n", NAMESPACE, "wait", "--for=condition=Ready", kind, "--all", "--timeout=5s")
                if result.returncode == 0 or time.monotonic() > deadline:
                    print((result.stdout or result.stderr).strip())
                    break
        say("kubectl get pgscale -o wide")
        print(kubectl("get", "pgscale", "-o", "wide"))
        say(f"pgscale status -n {NAMESPACE}")
        exe = str(Path(sys.executable).parent / "pgscale")
        status = subprocess.run(
            [exe, "status", "-n", NAMESPACE, "--kubeconfig", str(cp.kubeconfig)], capture_output=True, text=True
        )
        print((status.stdout or status.stderr).rstrip())
        say("what changed in the database")
        show_database(pg)
        say("what the operator created")
        print(kubectl("get", "cronjobs"))
        if not why_not:
            say("the retention CronJob's pod, started now instead of on the 1st at 02:00")
            kubectl("create", "job", "--from=cronjob/archive-completed-tasks-retention", "retention-now")
            result = cp.kubectl_run(
                "-n", NAMESPACE, "wait", "--for=condition=Complete", "job/retention-now", "--timeout=180s"
            )
            print((result.stdout or result.stderr).strip())
            print(kubectl("logs", "job/retention-now", "--tail=3"))
            say("kubectl get pods -A -o wide")
            print(cp.kubectl_run("get", "pods", "-A", "-o", "wide", check=True).stdout)
        say("events")
        print(kubectl("get", "events", "--sort-by=.lastTimestamp"))
        if args.keep:
            where = op.log if op else "kubectl logs -n pgscale-system deploy/pgscale"
            print(f"export KUBECONFIG={cp.kubeconfig}   # Ctrl-C stops everything; operator log: {where}")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    say("stopped everything")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except subprocess.CalledProcessError as exc:
        print(exc.stderr, file=sys.stderr)
        raise
