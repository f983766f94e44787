"""A Postgres restart during a conversion is a passing ConnectionLost (retried fast, the original
error kept), never an InternalError or a Stalled policy, and the conversion ends with every row."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import localenv
import psycopg
import pytest

from conftest import ROOT, Kubectl, load_example, scalar, seed_tasks

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def test_restart_mid_conversion_is_connection_lost(
    operator: localenv.OperatorProcess, kubectl: Kubectl, private_postgres: localenv.Postgres
) -> None:
    pg = private_postgres
    database = f"app_{uuid.uuid4().hex[:8]}"
    pg.execute(f'CREATE DATABASE "{database}"')
    with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        seed_tasks(conn, 100000)
    kubectl.secret("app-db", {"uri": pg.uri(database)})
    kubectl.apply(
        {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "DatabaseProfile",
            "metadata": {"name": "app"},
            "spec": {"connection": {"secretRef": {"name": "app-db"}}},
        }
    )
    policy = load_example("partitionpolicy.yaml")[0]
    policy["spec"]["conversion"].update(batchSize=500, pauseBetweenBatches="100ms")
    del policy["spec"]["retention"]
    kubectl.apply(policy)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        conv = kubectl.get("partitionpolicy", "task-by-month").get("status", {}).get("conversion") or {}
        if conv.get("step") == "prepared" and conv.get("rowsDone"):
            break
        time.sleep(0.2)
    else:
        raise AssertionError("the conversion did not start copying")
    time.sleep(2.0)  # status is written at the end of a 5 s slice: now the next one is copying
    mark = len(operator.log.read_text())
    pg.stop()  # fast shutdown: the copy's backend ends with admin_shutdown mid-step
    seen: set[str] = set()
    for _ in range(6):
        seen.add(str(ready(kubectl.get("partitionpolicy", "task-by-month")).get("reason")))
        time.sleep(0.5)
    pg.start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        obj = kubectl.get("partitionpolicy", "task-by-month")
        seen.add(str(ready(obj).get("reason")))
        if ready(obj).get("status") == "True":
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the conversion did not finish after the restart; reasons seen: {seen}")
    log = operator.log.read_text()[mark:]
    mine = [line for line in log.splitlines() if "task-by-month" in line and kubectl.namespace in line]
    assert any("ConnectionLost" in line for line in mine) or "ConnectionLost" in seen, "\n".join(mine[-20:])
    assert "InternalError" not in seen and not any("InternalError" in line for line in mine), seen
    assert not any("the connection is closed" in line for line in mine), "\n".join(mine[-20:])
    events = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
    assert not [e for e in events if e["reason"] in ("InternalError", "ConnectionLost") and e["type"] == "Warning"]
    with psycopg.connect(pg.dsn(database), autocommit=True) as conn:
        assert scalar(conn, 'SELECT count(*) FROM "Task"') == 100000
        assert scalar(conn, """SELECT relkind FROM pg_class WHERE relname = 'Task'""") == "p"
