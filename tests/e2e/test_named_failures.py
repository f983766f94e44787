"""Known failures through the real operator are named conditions, never InternalError: a table in
a schema the profile's role cannot read (with the exact GRANT) for PartitionPolicy and
FileMigration, and a view named as a view."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import localenv
import psycopg
import pytest

from conftest import Kubectl, load_example, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


@pytest.fixture
def limited_role(postgres: localenv.Postgres, database: str) -> Iterator[str]:
    role = f"limited_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE \"{role}\" LOGIN PASSWORD 'pw-{role}'")
        conn.execute(f'GRANT CREATE ON DATABASE "{database}" TO "{role}"')  # its own stateSchema
        conn.execute('CREATE SCHEMA private; CREATE TABLE private."Task" (LIKE public."Task" INCLUDING ALL)')
        conn.execute('CREATE TABLE private."File" (LIKE public."File" INCLUDING ALL)')
        conn.execute('CREATE VIEW public."TaskView" AS SELECT * FROM public."Task"')
    yield role
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f'DROP OWNED BY "{role}" CASCADE')
    postgres.execute(f'DROP ROLE IF EXISTS "{role}"')


def ready(kubectl: Kubectl, kind: str, name: str) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = kubectl.get(kind, name).get("status", {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == "Ready"), {})


def test_unreadable_schema_and_view_are_named(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    postgres: localenv.Postgres,
    database: str,
    limited_role: str,
) -> None:
    role = limited_role
    kubectl.secret("limited-db", {"uri": postgres.uri(database, user=role, password=f"pw-{role}")})
    kubectl.apply(
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "DatabaseProfile",
            "metadata": {"name": "app"},
            "spec": {"connection": {"secretRef": {"name": "limited-db"}}},
        }
    )
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    partition = load_example("partitionpolicy.yaml")[0]
    partition["spec"]["table"] = {"schema": "private", "name": "Task"}
    files = load_example("filemigration.yaml")[0]
    files["spec"]["table"] = {"schema": "private", "name": "File"}
    view = load_example("partitionpolicy.yaml")[0]
    view["metadata"]["name"] = "on-a-view"
    view["spec"]["table"] = {"name": "TaskView"}
    for obj in (partition, files, view):
        kubectl.apply(obj)
    grant = f'GRANT USAGE ON SCHEMA "private" TO "{role}"'
    for kind, name in (("partitionpolicy", "task-by-month"), ("filemigration", "files-to-s3")):

        def named(k: str = kind, n: str = name) -> bool:
            return ready(kubectl, k, n).get("reason") == "InsufficientPrivilege"

        wait_until(named, what=f"{kind} InsufficientPrivilege", log=operator.log)
        assert grant in ready(kubectl, kind, name)["message"]
    wait_until(
        lambda: ready(kubectl, "partitionpolicy", "on-a-view").get("reason") == "NotATable",
        what="NotATable",
        log=operator.log,
    )
    assert "is a view, not a table" in ready(kubectl, "partitionpolicy", "on-a-view")["message"]
