"""DatabaseProfile end to end on a private PostgreSQL (ALTER SYSTEM is server-wide):
the strategy's settings are applied exactly, restart-required ones are reported, a
hand-made change is corrected, a bad value stops the whole change, a removed
parameter is reset, and the metrics endpoint shows the database."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest

from conftest import ROOT, Kubectl, scalar

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

STRATEGY = {
    "max_connections": "200",
    "shared_buffers": "256MB",
    "effective_cache_size": "1GB",
    "work_mem": "4MB",
    "maintenance_work_mem": "64MB",
    "checkpoint_completion_target": "0.9",
    "wal_buffers": "16MB",
    "random_page_cost": "1.1",
    "effective_io_concurrency": "200",
}


@pytest.fixture
def server(private_postgres: localenv.Postgres) -> localenv.Postgres:
    return private_postgres


def show(pg: localenv.Postgres, name: str) -> str:
    with psycopg.connect(pg.dsn()) as conn:
        return str(scalar(conn, f"SHOW {name}"))


def nudge(kubectl: Kubectl) -> None:
    kubectl.run("annotate", "dbp", "app", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")


def wait(kubectl: Kubectl, check: Any, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get("databaseprofile", "app")
        if check(obj):
            return obj
        time.sleep(0.5)
    raise AssertionError(json.dumps(obj.get("status"), indent=1))


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def test_strategy_settings_applied_kept_and_reported(
    operator: Any, kubectl: Kubectl, server: localenv.Postgres
) -> None:
    kubectl.secret("app-db", {"uri": server.uri("postgres")})
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.wait("databaseprofile", "app", "Ready")
    obj = kubectl.get("databaseprofile", "app")
    # Reported: shared_buffers and wal_buffers wait for a restart (max_connections was 200 already).
    assert set(obj["status"]["pendingRestart"]) == {"shared_buffers", "wal_buffers"}
    assert condition(obj, "RestartRequired")["status"] == "True"  # type: ignore[index]
    params = {p["name"]: p for p in obj["status"]["parameters"]}
    assert {n: p["desired"] for n, p in params.items()} == STRATEGY
    assert all(p["source"] == "parameters" for p in params.values())
    server.stop()
    server.start()  # what the RestartRequired condition asks the user to do
    for name, value in STRATEGY.items():
        assert show(server, name) == value, name  # exactly the strategy's values
    nudge(kubectl)
    obj = wait(kubectl, lambda o: condition(o, "RestartRequired") is None)
    assert obj["status"]["pendingRestart"] == []

    # A hand-made change is put back, with an Event.
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET work_mem = '64MB'")
        conn.execute("SELECT pg_reload_conf()")
    nudge(kubectl)
    wait(kubectl, lambda o: show(server, "work_mem") == "4MB")
    events = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
    assert any(e["reason"] == "DriftCorrected" and "work_mem" in e["message"] for e in events)

    # A bad value stops the whole change: the good one next to it is not applied either.
    kubectl.run(
        "patch",
        "dbp",
        "app",
        "--type=merge",
        "-p",
        json.dumps({"spec": {"parameters": {"work_mem": "4XB", "random_page_cost": "2"}}}),
    )
    kubectl.wait("databaseprofile", "app", "Stalled")
    stalled = condition(kubectl.get("databaseprofile", "app"), "Stalled")
    assert stalled is not None and stalled["reason"] == "InvalidParameter"
    assert stalled["message"].startswith("spec.parameters.work_mem: work_mem = '4XB' invalid unit 'XB'")
    assert show(server, "random_page_cost") == "1.1"

    # Removing a parameter resets it to the server's default.
    spec_params = dict(STRATEGY)
    del spec_params["effective_io_concurrency"]
    kubectl.run(
        "patch",
        "dbp",
        "app",
        "--type=json",
        "-p",
        json.dumps([{"op": "replace", "path": "/spec/parameters", "value": spec_params}]),
    )
    kubectl.wait("databaseprofile", "app", "Ready")
    with psycopg.connect(server.dsn()) as conn:  # 1 before PostgreSQL 18, 16 since
        default = scalar(conn, "SELECT boot_val FROM pg_settings WHERE name = 'effective_io_concurrency'")
    assert default == ("16" if server.major >= 18 else "1")
    wait(kubectl, lambda o: show(server, "effective_io_concurrency") == default)
    assert show(server, "work_mem") == "4MB"


def test_metrics_show_the_database(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute("""INSERT INTO "Task" (title) SELECT 't' || g FROM generate_series(1, 5000) g""")
        conn.execute('ANALYZE "Task"')
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {"connection": {"secretRef": {"name": "app-db"}}},
    }
    kubectl.apply(profile)
    kubectl.wait("databaseprofile", "app", "Ready")
    key = f'profile="{kubectl.namespace}/app"'
    text = urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5).read().decode()
    lines = [line for line in text.splitlines() if key in line]
    assert any(line.startswith("pgscale_pg_connections{") for line in lines)
    assert any(line.startswith("pgscale_pg_database_size_bytes{") for line in lines)
    assert any(line.startswith("pgscale_pg_table_size_bytes{") and 'table="public.Task"' in line for line in lines)
    assert any(line.startswith("pgscale_pg_unused_indexes{") for line in lines)
    assert any(line.startswith("pgscale_pg_connection_utilization_ratio{") for line in lines)
    obj = kubectl.get("databaseprofile", "app")
    cap = obj["status"]["capacity"]
    assert cap["databaseBytes"] > 0 and cap["recommendedTier"] == "development"
    assert any(t["name"] == "public.Task" for t in cap["tables"])


def test_pooler_objects_and_their_config_serve_clients(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str, tmp_path: Path
) -> None:
    import base64

    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {
            "connection": {"secretRef": {"name": "app-db"}},
            "pooling": {"poolMode": "transaction", "defaultPoolSize": 2, "instances": 2},
        },
    }
    kubectl.apply(profile)
    kubectl.wait("databaseprofile", "app", "Ready")
    deployment = kubectl.get("deployment", "app-pooler-rw")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["metadata"]["ownerReferences"][0]["kind"] == "DatabaseProfile"
    assert kubectl.get("service", "app-pooler-rw")["spec"]["ports"][0]["port"] == 5432
    files = {k: base64.b64decode(v).decode() for k, v in kubectl.get("secret", "app-pooler-rw-config")["data"].items()}
    # What the pod would run: the same pgbouncer.ini and userlist, with PgBouncer from Debian (port and
    # file path moved to this machine's temporary directory, nothing else changed).
    bouncer = localenv.PgBouncer(tmp_path)
    ini = files["pgbouncer.ini"].replace("listen_port = 5432", f"listen_port = {bouncer.port}")
    ini = ini.replace("/etc/pgbouncer/userlist.txt", str(bouncer.auth_file)).replace(
        "listen_addr = *", "listen_addr = 127.0.0.1"
    )
    bouncer.start(ini, files["userlist.txt"])
    try:
        with psycopg.connect(
            host="127.0.0.1",
            port=bouncer.port,
            dbname=database,
            user="postgres",
            password=postgres.PASSWORD,
            prepare_threshold=None,
        ) as conn:
            assert scalar(conn, 'SELECT count(*) FROM "Task"') == 0
    finally:
        bouncer.stop()
    kubectl.run("patch", "dbp", "app", "--type=json", "-p", '[{"op": "remove", "path": "/spec/pooling"}]')
    deadline = time.monotonic() + 30
    while (
        time.monotonic() < deadline
        and kubectl.cp.kubectl_run("-n", kubectl.namespace, "get", "deployment", "app-pooler-rw").returncode == 0
    ):
        time.sleep(0.5)
    assert "NotFound" in kubectl.cp.kubectl_run("-n", kubectl.namespace, "get", "deployment", "app-pooler-rw").stderr


def test_read_replicas_slots_services_and_cleanup(
    operator: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    import base64
    import uuid

    role = f"repl_{uuid.uuid4().hex[:8]}"
    kubectl.secret("replication", {"username": role, "password": "secret"})
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {
            "connection": {"secretRef": {"name": "app-db"}},
            "pooling": {"defaultPoolSize": 5},
            "readReplicas": {
                "instances": 2,
                "replicationSecretRef": {"name": "replication"},
                "storage": {"size": "10Gi"},
            },
        },
    }
    kubectl.apply(profile)
    # The primary lacks the replication role: the operator says so, and what to run.
    kubectl.wait("databaseprofile", "app", "Stalled")
    stalled = condition(kubectl.get("databaseprofile", "app"), "Stalled")
    assert stalled is not None and stalled["reason"] == "ReplicationNotReady"
    assert f'CREATE ROLE "{role}" WITH REPLICATION LOGIN' in stalled["message"]
    from pgscale.kube import ObjectRef
    from pgscale.specs import replicas

    prefix = replicas.slot_prefix(ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", kubectl.namespace, "app", ""))
    try:
        postgres.execute(f"CREATE ROLE {role} WITH REPLICATION LOGIN PASSWORD 'secret'")
        nudge(kubectl)
        kubectl.wait("databaseprofile", "app", "Ready")
        obj = kubectl.get("databaseprofile", "app")
        assert "pgscale.io/cleanup" in obj["metadata"]["finalizers"]  # slots live outside the cluster
        assert [r["slot"] for r in obj["status"]["replicas"]] == [f"{prefix}0", f"{prefix}1"]
        sts = kubectl.get("statefulset", "app-replica")
        assert sts["spec"]["replicas"] == 2
        assert kubectl.get("service", "app-ro")["spec"]["selector"]["pgscale.io/role"] == "replica"
        # A second pooler in front of the replicas.
        assert obj["status"]["pooler"]["readOnlyService"] == "app-pooler-ro"
        ini = kubectl.get("secret", "app-pooler-ro-config")["data"]["pgbouncer.ini"]
        assert f"host='app-ro.{kubectl.namespace}.svc' port=5432" in base64.b64decode(ini).decode()
        # The test primary listens on loopback, which pods cannot reach: no -rw Service, and an Event says why.
        events = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
        assert any(e["reason"] == "ReadWriteServiceSkipped" for e in events)
        with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
            slots = {
                r[0]
                for r in conn.execute(
                    "SELECT slot_name FROM pg_replication_slots WHERE slot_name LIKE %s", (prefix + "%",)
                ).fetchall()
            }
            assert slots == {f"{prefix}0", f"{prefix}1"}
            # Scaling down drops the freed slot.
            kubectl.run("patch", "dbp", "app", "--type=merge", "-p", '{"spec": {"readReplicas": {"instances": 1}}}')
            deadline = time.monotonic() + 30
            while (
                scalar(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE %s", (prefix + "%",)) != 1
            ):
                assert time.monotonic() < deadline
                time.sleep(0.5)
            # Deleting the profile drops the remaining slot before the resource goes.
            kubectl.run("delete", "dbp", "app", "--timeout=30s")
            assert (
                scalar(conn, "SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE %s", (prefix + "%",)) == 0
            )
    finally:
        postgres.execute(f"DROP ROLE IF EXISTS {role}")


def test_two_profiles_on_one_server_have_one_settings_owner(
    operator: Any, kubectl: Kubectl, server: localenv.Postgres
) -> None:
    """Issue 11, item 2: a later profile in another namespace with another work_mem is Stalled naming
    the first; work_mem never flips; drift is reported as "changed outside pgscale", rate-limited."""
    other = Kubectl(kubectl.cp, f"{kubectl.namespace}-b")
    kubectl.cp.kubectl_run("create", "namespace", other.namespace, check=True)
    try:
        for k in (kubectl, other):
            k.secret("app-db", {"uri": server.uri("postgres")})

        def profile(work_mem: str) -> dict[str, Any]:
            return {
                "apiVersion": "pgscale.io/v1alpha1",
                "kind": "DatabaseProfile",
                "metadata": {"name": "app"},
                "spec": {
                    "connection": {"secretRef": {"name": "app-db"}},
                    "parameters": {"work_mem": work_mem},
                    "monitoring": {"enabled": False},
                },
            }

        kubectl.apply(profile("8MB"))
        kubectl.wait("databaseprofile", "app", "Ready")
        assert show(server, "work_mem") == "8MB"
        other.apply(profile("16MB"))
        other.wait("databaseprofile", "app", "Stalled")
        later = other.get("databaseprofile", "app")
        stalled = condition(later, "Stalled")
        assert stalled is not None and stalled["reason"] == "SettingsConflict", stalled
        assert stalled["message"].startswith("spec.parameters.work_mem: ")
        assert f"DatabaseProfile {kubectl.namespace}/app" in stalled["message"] and "work_mem" in stalled["message"]
        first = kubectl.get("databaseprofile", "app")
        assert later["status"]["systemIdentifier"] == first["status"]["systemIdentifier"]
        assert condition(first, "Ready")["status"] == "True"  # type: ignore[index]
        # No flip-flopping: ~20 s of samples, each reconcile of either profile nudged along.
        samples = set()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            for k in (kubectl, other):
                k.run("annotate", "dbp", "app", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")
            samples.add(show(server, "work_mem"))
            time.sleep(1)
        assert samples == {"8MB"}
        assert condition(other.get("databaseprofile", "app"), "Stalled")["reason"] == "SettingsConflict"  # type: ignore[index]
        assert not [
            e
            for e in json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
            if e["reason"] == "DriftCorrected"
        ]

        # Drift from outside pgscale is set back every time, but told once per parameter per 10 minutes.
        for _ in range(2):
            with psycopg.connect(server.dsn(), autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET work_mem = '64MB'")
                conn.execute("SELECT pg_reload_conf()")
            nudge(kubectl)
            wait(kubectl, lambda o: show(server, "work_mem") == "8MB")
        drift = [
            e
            for e in json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
            if e["reason"] == "DriftCorrected"
        ]
        assert len(drift) == 1 and drift[0]["message"].startswith("changed outside pgscale, set back: work_mem")
        assert "by hand" not in drift[0]["message"]

        # The owner gone, the other profile takes the server's settings over (woken by the deletion).
        kubectl.run("delete", "dbp", "app", "--timeout=30s")
        other.wait("databaseprofile", "app", "Ready", timeout=60)
        assert show(server, "work_mem") == "16MB"
    finally:
        kubectl.cp.kubectl_run("delete", "databaseprofiles", "--all", "-n", other.namespace, "--wait=false")
        kubectl.cp.kubectl_run("delete", "namespace", other.namespace, "--wait=false")
