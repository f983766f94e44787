"""DatabaseSplit end to end: the operator moves the sample app's messages to a database of their own on a
second server (both wal_level=logical) while a writer inserts and updates messages; cutover, rollback,
cutover again and finalize through spec.phase; the application's Secret follows; deleting a split
mid-way leaves no replication object behind."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import localenv
import psycopg
import pytest

from conftest import ROOT, Kubectl, load_example, scalar, wait_until
from writers import MessageWriter, messages, until

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


@pytest.fixture
def split_databases(logical_servers: tuple[localenv.Postgres, localenv.Postgres]) -> Iterator[str]:
    """The sample app's database on the source server (with messages), an empty one on the target."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    for server in logical_servers:
        server.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(logical_servers[0].dsn(name), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        conn.execute("INSERT INTO \"Task\" (title) SELECT 'task ' || g FROM generate_series(1, 10) g")
        conn.execute('INSERT INTO "Message" (body, "taskId") SELECT \'seed \' || g, 1 FROM generate_series(1, 2000) g')
    yield name
    for server in logical_servers:
        with psycopg.connect(server.dsn(name), autocommit=True) as conn:
            for (sub,) in conn.execute("SELECT subname FROM pg_subscription").fetchall():
                conn.execute(f'ALTER SUBSCRIPTION "{sub}" DISABLE')
                conn.execute(f'ALTER SUBSCRIPTION "{sub}" SET (slot_name = NONE)')
                conn.execute(f'DROP SUBSCRIPTION "{sub}"')
    for server in logical_servers:
        server.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE NOT active")
        server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def secret_data(server: localenv.Postgres, dbname: str) -> dict[str, str]:
    return {
        "uri": server.uri(dbname),
        "host": server.host,
        "port": str(server.port),
        "dbname": dbname,
        "username": "postgres",
        "password": server.PASSWORD,
    }


def setup(kubectl: Kubectl, servers: tuple[localenv.Postgres, localenv.Postgres], dbname: str) -> dict[str, Any]:
    """The Secrets and profiles of both databases; the example's split, returned (not applied)."""
    kubectl.secret("app-db", secret_data(servers[0], dbname))
    kubectl.secret("messages-db", secret_data(servers[1], dbname))
    kubectl.apply(
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "DatabaseProfile",
            "metadata": {"name": "app"},
            "spec": {"connection": {"secretRef": {"name": "app-db"}}},
        }
    )
    profile, split = load_example("databasesplit.yaml")
    kubectl.apply(profile)
    return split


def status(kubectl: Kubectl) -> dict[str, Any]:
    return dict(kubectl.get("databasesplit", "messages").get("status") or {})


def ready(kubectl: Kubectl, phase: str, writes_to: str) -> bool:
    got = kubectl.get("databasesplit", "messages")
    st = got.get("status") or {}
    conditions = {c["type"]: c["status"] for c in st.get("conditions") or []}
    return (
        st.get("observedGeneration") == got["metadata"]["generation"]
        and conditions.get("Ready") == "True"
        and st.get("phase") == phase
        and st.get("writesTo") == writes_to
    )


def app_secret(kubectl: Kubectl) -> dict[str, str]:
    secret = kubectl.get("secret", "messages-connection")
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def replication_objects(server: localenv.Postgres, dbname: str) -> tuple[int, int, int]:
    with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
        return (
            scalar(conn, "SELECT count(*) FROM pg_replication_slots"),
            scalar(conn, "SELECT count(*) FROM pg_publication"),
            scalar(conn, "SELECT count(*) FROM pg_subscription"),
        )


def set_phase(kubectl: Kubectl, phase: str) -> None:
    kubectl.run("patch", "databasesplit", "messages", "--type", "merge", "-p", f'{{"spec":{{"phase":"{phase}"}}}}')


def test_messages_move_to_their_own_database_and_back_and_for_good(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    logical_servers: tuple[localenv.Postgres, localenv.Postgres],
    split_databases: str,
) -> None:
    source, target = logical_servers
    dbname = split_databases
    kubectl.apply(setup(kubectl, logical_servers, dbname))
    wait_until(lambda: ready(kubectl, "Replicating", "source"), 120, "the split to replicate", log=operator.log)
    st = status(kubectl)
    assert [t["state"] for t in st["tables"]] == ["ready"] and st["tables"][0]["name"] == "public.Message"
    assert app_secret(kubectl)["port"] == str(source.port)
    obj = kubectl.get("databasesplit", "messages")
    assert "pgscale.io/cleanup" in obj["metadata"]["finalizers"]

    with (
        psycopg.connect(source.dsn(dbname), autocommit=True) as src,
        psycopg.connect(target.dsn(dbname), autocommit=True) as dst,
    ):
        record = messages(src)
        writer = MessageWriter({"source": source.dsn(dbname), "target": target.dsn(dbname)}, record)
        writer.start()
        try:
            until("writes", lambda: writer.writes > 50)
            set_phase(kubectl, "cutover")
            wait_until(lambda: ready(kubectl, "CutOver", "target"), 120, "the cutover", log=operator.log)
            st = status(kubectl)
            block = st["longestWriteBlockMs"]
            assert block < 1000, st
            assert st["lastCutover"]["direction"] == "toTarget" and st["lastCutover"]["rowsVerified"] >= 2000
            # The application's new Secret connects, to the target, and takes writes.
            with psycopg.connect(app_secret(kubectl)["uri"], autocommit=True) as app:
                assert scalar(app, "SELECT inet_server_port()") == target.port
            written = writer.writes
            until("writes on the target", lambda: writer.route == "target" and writer.writes > written + 50)
            set_phase(kubectl, "rollback")
            wait_until(lambda: ready(kubectl, "Replicating", "source"), 120, "the rollback", log=operator.log)
            assert app_secret(kubectl)["port"] == str(source.port)
            written = writer.writes
            until("writes on the source", lambda: writer.route == "source" and writer.writes > written + 50)
            set_phase(kubectl, "cutover")
            wait_until(lambda: ready(kubectl, "CutOver", "target"), 120, "the second cutover", log=operator.log)
            written = writer.writes
            until("writes on the target again", lambda: writer.route == "target" and writer.writes > written + 50)
        finally:
            writer.stop.set()
            writer.join(10)
        assert not writer.errors, writer.errors[:5]
        assert messages(dst) == record, "every row on the target equals the writer's record"
        until("the source to catch up", lambda: messages(src) == messages(dst))
        assert scalar(dst, "INSERT INTO \"Message\" (body) VALUES ('after') RETURNING id") > max(record)
    set_phase(kubectl, "finalize")
    wait_until(lambda: status(kubectl).get("phase") == "Finalized", 120, "finalize", log=operator.log)
    assert replication_objects(source, dbname) == (0, 0, 0)
    assert replication_objects(target, dbname) == (0, 0, 0)
    wait_until(
        lambda: not kubectl.get("databasesplit", "messages")["metadata"].get("finalizers"), 60, "the finalizer to go"
    )
    surfaces = json.dumps(kubectl.get("databasesplit", "messages")) + kubectl.run("get", "events", "-o", "json")
    assert source.PASSWORD not in surfaces + operator.log.read_text(errors="replace")
    print(f"\nlongest write block {block} ms; the writer's longest {writer.longest * 1000:.0f} ms")


def test_deleting_a_split_mid_way_drops_its_replication_objects(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    logical_servers: tuple[localenv.Postgres, localenv.Postgres],
    split_databases: str,
) -> None:
    source, target = logical_servers
    kubectl.apply(setup(kubectl, logical_servers, split_databases))
    wait_until(lambda: ready(kubectl, "Replicating", "source"), 120, "the split to replicate", log=operator.log)
    assert replication_objects(source, split_databases)[:2] == (1, 1)
    assert replication_objects(target, split_databases)[2] == 1
    kubectl.run("delete", "databasesplit", "messages", "--timeout=60s")
    assert replication_objects(source, split_databases) == (0, 0, 0)
    assert replication_objects(target, split_databases) == (0, 0, 0)


def test_the_api_server_refuses_a_split_that_cannot_work(
    control_plane: localenv.ControlPlane, kubectl: Kubectl
) -> None:
    split = load_example("databasesplit.yaml")[1]
    both = {**split, "spec": {**split["spec"], "schema": "public"}}
    result = kubectl.apply(both, check=False)
    assert result.returncode != 0 and "set exactly one of tables or schema" in result.stderr
    same = {**split, "spec": {**split["spec"], "target": {"profileRef": {"name": "app"}}}}
    result = kubectl.apply(same, check=False)
    assert result.returncode != 0 and "source and target must be different DatabaseProfiles" in result.stderr
    bad = {**split, "spec": {**split["spec"], "phase": "switch"}}
    assert kubectl.apply(bad, check=False).returncode != 0
    kubectl.apply(split)
    moved = {**split, "spec": {**split["spec"], "tables": [{"name": "Task"}]}}
    result = kubectl.apply(moved, check=False)
    assert result.returncode != 0 and "tables is immutable" in result.stderr
    to_schema = {**split, "spec": {k: v for k, v in split["spec"].items() if k != "tables"} | {"schema": "public"}}
    result = kubectl.apply(to_schema, check=False)
    assert result.returncode != 0 and "immutable" in result.stderr, result.stderr


def test_a_refused_split_is_stalled_naming_the_fix_and_holds_no_finalizer(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    logical_servers: tuple[localenv.Postgres, localenv.Postgres],
    split_databases: str,
) -> None:
    split = setup(kubectl, logical_servers, split_databases)
    kubectl.apply({**split, "spec": {**split["spec"], "crossForeignKeys": "refuse"}})

    def stalled() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in status(kubectl).get("conditions") or []}
        found = conditions.get("Stalled")
        return found if found and found["status"] == "True" else None

    condition = wait_until(stalled, 60, "the refusal", log=operator.log)
    assert condition["reason"] == "CrossForeignKeys"
    assert 'ALTER TABLE public."Message" DROP CONSTRAINT "Message_taskId_fkey"' in condition["message"]
    assert not kubectl.get("databasesplit", "messages")["metadata"].get("finalizers")
    for server in logical_servers:
        assert replication_objects(server, split_databases) == (0, 0, 0)
