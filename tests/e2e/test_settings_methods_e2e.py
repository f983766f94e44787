"""Settings methods through the real operator (issue 15).

- A role with no superuser, no CREATEROLE and no replication, owning its database (a managed
  service's application role, created with the SQL of docs/databaseprofile.md): `auto` picks the
  database method, new sessions see the database-level values, and the server-level ones are listed
  in status and an Event with the values to set elsewhere. Two databases never conflict.
- Two profiles on one (private) server: the later one is Stalled naming the earlier one and the
  parameter; it recovers when it changes to the database method; the earlier one switching to the
  database method resets its ALTER SYSTEM values.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import localenv
import psycopg
import pytest

from conftest import Kubectl, scalar
from docs_sql import renamed, sql_block

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
DATABASE_LEVEL = {
    "effective_cache_size",
    "work_mem",
    "maintenance_work_mem",
    "random_page_cost",
    "effective_io_concurrency",
}


DOCS_HEADING = "### For the `database` method (managed services, shared servers)"


def show(dsn: str, name: str) -> str:
    """SHOW in a new session."""
    with psycopg.connect(dsn) as conn:
        return str(scalar(conn, f"SHOW {name}"))


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), None)


def wait_for(
    kubectl: Kubectl, name: str, check: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    obj: dict[str, Any] = {}
    while time.monotonic() < deadline:
        obj = kubectl.get("databaseprofile", name)
        if check(obj):
            return obj
        time.sleep(0.5)
    raise AssertionError(json.dumps(obj.get("status"), indent=1))


def events(kubectl: Kubectl, name: str, reason: str) -> list[dict[str, Any]]:
    items = json.loads(kubectl.run("get", "events", "-o", "json"))["items"]
    return [e for e in items if e["involvedObject"]["name"] == name and e["reason"] == reason]


def profile(name: str, secret: str, parameters: dict[str, str], **settings: str) -> dict[str, Any]:
    spec: dict[str, Any] = {"connection": {"secretRef": {"name": secret}}, "parameters": parameters}
    if settings:
        spec["settings"] = settings
    return {"apiVersion": "pgscale.io/v1alpha1", "kind": "DatabaseProfile", "metadata": {"name": name}, "spec": spec}


@pytest.fixture
def app_role(postgres: localenv.Postgres) -> Iterator[tuple[str, str, list[str]]]:
    """docs/databaseprofile.md's least-privilege role of the database method (its SQL, renamed for the
    shared server), owning its database and a second one: (role, password, databases)."""
    role = f"app_{uuid.uuid4().hex[:8]}"
    databases = [role, f"{role}_b"]
    for database, statement in renamed(sql_block(DOCS_HEADING), {"app": role}):
        postgres.execute(statement, dbname=database or "postgres")
    postgres.execute(f"CREATE DATABASE {databases[1]} OWNER {role}")
    yield role, "change-me", databases
    for db in databases:
        postgres.execute(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
    postgres.execute(f"DROP ROLE IF EXISTS {role}")


def test_least_privilege_role_auto_picks_database(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    postgres: localenv.Postgres,
    app_role: tuple[str, str, list[str]],
) -> None:
    role, password, (db, other_db) = app_role
    with psycopg.connect(postgres.dsn(db, user=role, password=password)) as conn:
        row = conn.execute("SELECT rolsuper, rolcreaterole, rolreplication FROM pg_roles WHERE rolname = current_user")
        assert row.fetchone() == (False, False, False)
    kubectl.secret("app-db", {"uri": postgres.uri(db, user=role, password=password)})
    # The strategy's nine values, plus a reload-level and a superuser-level setting nobody else on this
    # shared server sets (so they surely differ from what it runs).
    parameters = {**STRATEGY, "checkpoint_timeout": "7min", "log_min_duration_statement": "250ms"}
    kubectl.apply(profile("app", "app-db", parameters))
    kubectl.wait("databaseprofile", "app", "Ready", timeout=90)
    obj = kubectl.get("databaseprofile", "app")
    status = obj["status"]
    assert status["settingsMethod"] == "database", status
    assert f"role {role} may not ALTER SYSTEM" in status["settingsMethodReason"]
    assert status["database"] == db
    ready = condition(obj, "Ready")["message"]  # type: ignore[index]
    assert ready.endswith("5 of 11 settings kept (database method), 4 to set in the server's configuration"), ready
    # The database-level values: SHOW in a new session, as the role and as any other role of that database.
    for name in DATABASE_LEVEL:
        assert show(postgres.dsn(db, user=role, password=password), name) == STRATEGY[name], name
        assert show(postgres.dsn(db), name) == STRATEGY[name], name
    assert show(postgres.dsn(other_db, user=role, password=password), "work_mem") == "4MB"  # another database
    params = {p["name"]: p for p in status["parameters"]}
    assert {n for n, p in params.items() if p.get("applied", True)} == DATABASE_LEVEL
    assert all(params[n]["effective"] == STRATEGY[n] for n in DATABASE_LEVEL)
    # The server-level ones: in status (applied false), a condition and an Event with name=value to set
    # elsewhere, for each one the server does not run already.
    external = {n: p for n, p in params.items() if not p.get("applied", True)}
    assert set(external) == set(parameters) - DATABASE_LEVEL
    elsewhere = [f"{n}={p['desired']}" for n, p in sorted(external.items()) if p.get("effective") != p["desired"]]
    assert "checkpoint_timeout=7min" in elsewhere and "log_min_duration_statement=250ms" in elsewhere
    flagged = condition(obj, "ParametersExternal")
    assert flagged is not None and flagged["status"] == "True" and flagged["reason"] == "SetElsewhere"
    told = events(kubectl, "app", "ParametersExternal")
    assert len(told) == 1 and told[0]["type"] == "Warning"
    for pair in elsewhere:
        assert pair in told[0]["message"] and pair in flagged["message"]
    assert "provider's parameter group" in told[0]["message"]
    assert "GRANT SET ON PARAMETER log_min_duration_statement TO it" in told[0]["message"]
    assert any("ALTER DATABASE" in e["message"] for e in events(kubectl, "app", "ParametersApplied"))
    with psycopg.connect(postgres.dsn()) as conn:  # nothing went to ALTER SYSTEM
        assert scalar(conn, "SELECT count(*) FROM pg_file_settings WHERE name = 'checkpoint_timeout'") == 0

    # A database-level value leaving the spec is reset; the second database, with its own profile and
    # another work_mem, never conflicts with the first.
    del parameters["random_page_cost"]
    kubectl.apply(profile("app", "app-db", parameters))
    kubectl.secret("other-db", {"uri": postgres.uri(other_db, user=role, password=password)})
    kubectl.apply(profile("other", "other-db", {"work_mem": "32MB"}))
    kubectl.wait("databaseprofile", "other", "Ready", timeout=90)
    # Back to what the server runs without the database's value (an earlier test may have set it by ALTER SYSTEM).
    server_value = show(postgres.dsn("postgres"), "random_page_cost")
    wait_for(kubectl, "app", lambda o: show(postgres.dsn(db), "random_page_cost") == server_value)
    assert show(postgres.dsn(other_db), "work_mem") == "32MB" and show(postgres.dsn(db), "work_mem") == "4MB"
    assert condition(kubectl.get("databaseprofile", "app"), "Ready")["status"] == "True"  # type: ignore[index]

    # ALTER SYSTEM asked for explicitly, by a role that may not: Stalled naming the field and the fix.
    kubectl.apply(profile("other", "other-db", {"work_mem": "32MB"}, method="alterSystem"))
    stalled = wait_for(kubectl, "other", lambda o: (condition(o, "Stalled") or {}).get("status") == "True")
    message = condition(stalled, "Stalled")["message"]  # type: ignore[index]
    assert condition(stalled, "Stalled")["reason"] == "SettingsMethodUnavailable"  # type: ignore[index]
    assert message.startswith(f"spec.settings.method: alterSystem is not possible for role '{role}'")
    assert f'GRANT ALTER SYSTEM ON PARAMETER work_mem TO "{role}"' in message


def test_two_profiles_on_one_server_conflict_then_resolve(
    operator: localenv.OperatorProcess, kubectl: Kubectl, private_postgres: localenv.Postgres
) -> None:
    server = private_postgres
    for db in ("first_db", "second_db"):
        server.execute(f"CREATE DATABASE {db}")
    kubectl.secret("first-db", {"uri": server.uri("first_db")})
    kubectl.secret("second-db", {"uri": server.uri("second_db")})
    kubectl.apply(profile("first", "first-db", {"work_mem": "8MB"}))
    kubectl.wait("databaseprofile", "first", "Ready", timeout=90)
    assert kubectl.get("databaseprofile", "first")["status"]["settingsMethod"] == "alterSystem"  # a superuser
    # Created in the same second or later: "second" is the later one (creationTimestamp, then name).
    kubectl.apply(profile("second", "second-db", {"work_mem": "16MB"}))
    stalled = wait_for(kubectl, "second", lambda o: (condition(o, "Stalled") or {}).get("status") == "True")
    found = condition(stalled, "Stalled")
    assert found is not None and found["reason"] == "SettingsConflict"
    assert found["message"].startswith("spec.parameters.work_mem: the server-wide settings of this server")
    assert f"DatabaseProfile {kubectl.namespace}/first" in found["message"]
    assert show(server.dsn("second_db"), "work_mem") == "8MB"  # the first one's, server-wide

    # The later one changes to the database method: its values are its database's, no conflict.
    kubectl.apply(profile("second", "second-db", {"work_mem": "16MB"}, method="database"))
    wait_for(kubectl, "second", lambda o: (condition(o, "Ready") or {}).get("status") == "True")
    assert show(server.dsn("second_db"), "work_mem") == "16MB"
    assert show(server.dsn("first_db"), "work_mem") == "8MB" and show(server.dsn(), "work_mem") == "8MB"

    # The earlier one switches too: what ALTER SYSTEM had set is reset, its database gets the value.
    kubectl.apply(profile("first", "first-db", {"work_mem": "8MB"}, method="database"))
    wait_for(kubectl, "first", lambda o: o.get("status", {}).get("settingsMethod") == "database")
    wait_for(kubectl, "first", lambda o: show(server.dsn(), "work_mem") == "4MB")
    with psycopg.connect(server.dsn()) as conn:
        assert scalar(conn, "SELECT count(*) FROM pg_file_settings WHERE name = 'work_mem'") == 0
    assert show(server.dsn("first_db"), "work_mem") == "8MB" and show(server.dsn("second_db"), "work_mem") == "16MB"
    reset = events(kubectl, "first", "ParametersReset")
    assert any(e["message"] == "set by the alterSystem method, no longer used, reset: work_mem" for e in reset)
    changed = events(kubectl, "first", "SettingsMethodChanged")
    assert changed and changed[0]["message"].startswith(
        "settings are now kept by the database method (was alterSystem)"
    )
    for name in ("first", "second"):
        assert condition(kubectl.get("databaseprofile", name), "Ready")["status"] == "True"  # type: ignore[index]
