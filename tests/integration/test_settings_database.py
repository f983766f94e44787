"""The database method and switching methods, on a real server: what the role may do (pg_settings,
pg_parameter_acl, the database's owner), ALTER DATABASE / ALTER ROLE ... IN DATABASE values seen by a
new session, drift put back, removed values reset, and what another method had set undone.

Database-level values run on the shared server (each test has its own database); ALTER SYSTEM only on
a private one."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import localenv
import psycopg
import pytest

from conftest import scalar
from docs_sql import sql_block
from pgscale import server_settings
from pgscale.api.databaseprofile import SettingsSpec
from pgscale.errors import SpecError
from pgscale.pg import settings as pgs
from pgscale.pg.connection import ConnInfo
from pgscale.settings_method import alter_system_gaps, resolve

pytestmark = pytest.mark.postgres

PROFILE = "ns/app"


def info(pg: localenv.Postgres, database: str, user: str = "postgres", password: str | None = None) -> ConnInfo:
    return ConnInfo(pg.host, pg.port, database, user, password or pg.PASSWORD)


def connect(i: ConnInfo) -> psycopg.Connection:
    return psycopg.connect(**i.kwargs(), autocommit=True)


def show(i: ConnInfo, name: str) -> str:
    """SHOW in a new session."""
    with connect(i) as conn:
        return str(scalar(conn, f"SHOW {name}"))


@pytest.fixture
def owner(postgres: localenv.Postgres, database: str) -> Iterator[ConnInfo]:
    """A role like a managed service's application role: no superuser, CREATEROLE, CREATEDB or
    replication; it owns the test's database and nothing else."""
    role = f"owner_{uuid.uuid4().hex[:8]}"
    postgres.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}' NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION")
    postgres.execute(f'ALTER DATABASE "{database}" OWNER TO {role}')
    yield info(postgres, database, role, f"pw-{role}")
    postgres.execute(f'ALTER DATABASE "{database}" OWNER TO postgres')
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute(f"DROP OWNED BY {role} CASCADE")
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        if int(scalar(conn, "SHOW server_version_num")) >= 150000:
            conn.execute(f"REVOKE ALL ON PARAMETER log_min_duration_statement FROM {role}")
    postgres.execute(f"DROP ROLE IF EXISTS {role}")


DESIRED = {
    "work_mem": ("8MB", "parameters"),
    "random_page_cost": ("1.1", "parameters"),
    "search_path": ('"$user", public, extra', "parameters"),
    "log_min_duration_statement": ("1s", "parameters"),  # superuser setting: GRANT SET ON PARAMETER needed
    "shared_buffers": ("256MB", "parameters"),  # server-level
}


def reconcile(
    conn: psycopg.Connection, i: ConnInfo, desired: dict[str, tuple[str, str]], role: str | None = None
) -> server_settings.SettingsReport:
    facts = pgs.privileges(conn, sorted(desired))
    return server_settings.reconcile_database(
        conn, i, state_schema="pgscale", profile=PROFILE, desired=desired, facts=facts, role=role
    )


def test_privileges_of_a_superuser_and_of_a_database_owner(postgres: localenv.Postgres, owner: ConnInfo) -> None:
    names = ["work_mem", "log_min_duration_statement", "shared_buffers"]
    with connect(info(postgres, owner.dbname)) as conn:
        su = pgs.privileges(conn, names)
    assert su.superuser and su.database_owner and su.alter_system == set(names) and su.file_settings and su.reload
    with connect(owner) as conn:
        facts = pgs.privileges(conn, names)
        assert (facts.role, facts.superuser, facts.database_owner) == (owner.user, False, True)
        assert not (facts.alter_system or facts.set or facts.file_settings or facts.reload)
        assert facts.allow_alter_system and facts.database == owner.dbname
        if facts.version_num >= 150000:  # privileges per parameter came with 15
            postgres.execute(f"GRANT SET ON PARAMETER log_min_duration_statement TO {owner.user}")
            postgres.execute(f"GRANT ALTER SYSTEM ON PARAMETER log_min_duration_statement TO {owner.user}")
            facts = pgs.privileges(conn, names)
            assert facts.set == {"log_min_duration_statement"} == facts.alter_system
        # pg_settings hides superuser-only settings from this role: the message says so, not "misspelt".
        assert (
            "GRANT pg_read_all_settings"
            in pgs.problems(conn, {"shared_preload_libraries": "x"})["shared_preload_libraries"]
        )


def test_database_values_applied_seen_by_new_sessions_kept_and_reset(
    postgres: localenv.Postgres, owner: ConnInfo
) -> None:
    superuser = info(postgres, owner.dbname)
    with connect(owner) as conn:
        before = str(scalar(conn, "SHOW work_mem"))
        report = reconcile(conn, owner, DESIRED)
        assert sorted(report.applied) == ["random_page_cost", "search_path", "work_mem"]
        assert report.statement == f'ALTER DATABASE "{owner.dbname}"'
        entries = {p.name: p for p in report.parameters}
        assert {n for n, p in entries.items() if p.applied} == {"work_mem", "random_page_cost", "search_path"}
        assert entries["work_mem"].effective == "8MB" and entries["search_path"].effective == '"$user", public, extra'
        # Not applied, and not what the server runs: to be set elsewhere, with the value.
        assert report.external == {"shared_buffers": "256MB", "log_min_duration_statement": "1s"}
        assert report.privileged == ["log_min_duration_statement"]
        assert str(scalar(conn, "SHOW work_mem")) == before  # this session started before the change
        # Every role's new session in this database sees the values; other databases do not.
        for who in (owner, superuser):
            assert show(who, "work_mem") == "8MB" and show(who, "random_page_cost") == "1.1"
        assert show(info(postgres, "postgres"), "work_mem") == "4MB"

        assert reconcile(conn, owner, DESIRED).applied == []  # nothing differs (search_path compared as a list)

        with connect(superuser) as other:
            other.execute(f"ALTER DATABASE \"{owner.dbname}\" SET work_mem = '64MB'")
        report = reconcile(conn, owner, DESIRED)
        assert (report.corrected, report.applied) == (["work_mem"], [])
        assert show(owner, "work_mem") == "8MB"

        # A value that left the spec is reset; the others stay.
        smaller = {k: v for k, v in DESIRED.items() if k != "random_page_cost"}
        report = reconcile(conn, owner, smaller)
        assert report.reset == ["random_page_cost"] and report.applied == []
        stored = pgs.database_settings(conn, None)
        assert "random_page_cost" not in stored and stored["work_mem"] == "8MB"
        # What the server runs without the database's value (an earlier test may have set it by ALTER SYSTEM).
        assert show(owner, "random_page_cost") == show(info(postgres, "postgres"), "random_page_cost")

        # A role's own value wins over the database's: reported as overridden, not fought.
        with connect(superuser) as other:
            other.execute(f"ALTER ROLE {owner.user} IN DATABASE \"{owner.dbname}\" SET work_mem = '2MB'")
        report = reconcile(conn, owner, smaller)
        assert report.overridden == {"work_mem": "database user"} and report.applied == []
        with connect(superuser) as other:
            other.execute(f'ALTER ROLE {owner.user} IN DATABASE "{owner.dbname}" RESET work_mem')

        # With GRANT SET ON PARAMETER (PostgreSQL 15+), a superuser setting goes per database too.
        if pgs.privileges(conn, []).version_num < 150000:
            return
        postgres.execute(f"GRANT SET ON PARAMETER log_min_duration_statement TO {owner.user}")
        report = reconcile(conn, owner, smaller)
        assert report.applied == ["log_min_duration_statement"] and report.external == {"shared_buffers": "256MB"}
        assert show(owner, "log_min_duration_statement") == "1s"


def test_per_role_values_and_switching_scope(postgres: localenv.Postgres, owner: ConnInfo) -> None:
    superuser = info(postgres, owner.dbname)
    desired = {"work_mem": ("8MB", "parameters")}
    with connect(owner) as conn:
        reconcile(conn, owner, desired)
        assert pgs.database_settings(conn, None) == {"work_mem": "8MB"}
        # settings.role = the connecting role itself: ALTER ROLE ... IN DATABASE, no CREATEROLE needed;
        # the database-wide value it had set is reset.
        report = reconcile(conn, owner, {"work_mem": ("16MB", "parameters")}, role=owner.user)
        assert report.applied == ["work_mem"] and report.reset == ["work_mem"]
        assert report.statement == f'ALTER ROLE "{owner.user}" IN DATABASE "{owner.dbname}"'
        assert pgs.database_settings(conn, None) == {} and pgs.database_settings(conn, owner.user) == {
            "work_mem": "16MB"
        }
        assert show(owner, "work_mem") == "16MB" and show(superuser, "work_mem") == "4MB"  # only that role
        # Another role's defaults: only with CREATEROLE (or as a superuser); named, with the fix.
        with pytest.raises(SpecError) as err:
            reconcile(conn, owner, desired, role="postgres")
        assert err.value.field == "settings.role" and err.value.reason == "SettingsMethodUnavailable"
        assert "CREATEROLE" in err.value.message
        with pytest.raises(SpecError) as err:
            reconcile(conn, owner, desired, role="no_such_role")
        assert err.value.reason == "RoleNotFound"
    # A superuser may set any role's values.
    with connect(superuser) as conn:
        report = server_settings.reconcile_database(
            conn,
            superuser,
            state_schema="pgscale_su",
            profile=PROFILE,
            desired=desired,
            facts=pgs.privileges(conn, ["work_mem"]),
            role=owner.user,
        )
        entry = report.parameters[0]
        assert entry.applied and entry.effective == "8MB"  # what that role's new sessions start with
        assert show(owner, "work_mem") == "8MB"


def test_a_role_that_does_not_own_the_database_is_told_how(postgres: localenv.Postgres, database: str) -> None:
    role = f"plain_{uuid.uuid4().hex[:8]}"
    postgres.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    postgres.execute(f'GRANT CREATE ON DATABASE "{database}" TO {role}')
    try:
        plain = info(postgres, database, role, f"pw-{role}")
        with connect(plain) as conn:
            with pytest.raises(SpecError) as err:
                reconcile(conn, plain, {"work_mem": ("8MB", "parameters")})
            assert err.value.field == "settings.method" and err.value.reason == "SettingsMethodUnavailable"
            assert f'ALTER DATABASE "{database}" OWNER TO "{role}"' in err.value.message
            # Server-level settings only: nothing to write, nothing needed.
            report = reconcile(conn, plain, {"max_connections": ("300", "parameters")})
            assert report.external == {"max_connections": "300"} and not report.parameters[0].applied
    finally:
        with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
            conn.execute(f"DROP OWNED BY {role} CASCADE")
        postgres.execute(f"DROP ROLE {role}")


@pytest.fixture
def server(private_postgres: localenv.Postgres) -> localenv.Postgres:
    return private_postgres


def auto_conf(conn: psycopg.Connection) -> dict[str, str]:
    return pgs.configured(conn)


def test_switching_methods_resets_what_the_other_had_set(server: localenv.Postgres) -> None:
    server.execute("CREATE DATABASE app")
    su = info(server, "app")
    desired = {"work_mem": ("8MB", "parameters"), "shared_buffers": ("256MB", "parameters")}
    with connect(su) as conn:
        server_settings.reconcile(conn, "pgscale", PROFILE, desired)
        assert auto_conf(conn) == {"work_mem": "8MB", "shared_buffers": "256MB"}
        # alterSystem -> database: ALTER SYSTEM's values are reset, the database's set.
        recorded = server_settings.records(conn, "pgscale", PROFILE)
        facts = pgs.privileges(conn, sorted(set(desired) | recorded.names))
        retired = server_settings.retire_alter_system(conn, "pgscale", PROFILE, recorded.alter_system, facts)
        assert retired is not None and retired.reset == ["shared_buffers", "work_mem"] and not retired.left
        report = server_settings.reconcile_database(
            conn, su, state_schema="pgscale", profile=PROFILE, desired=desired, facts=facts, role=None
        )
        assert auto_conf(conn) == {} and pgs.database_settings(conn, None) == {"work_mem": "8MB"}
        assert report.external == {"shared_buffers": "256MB"}
        # database -> alterSystem: the database's value goes (it would win over ALTER SYSTEM's).
        recorded = server_settings.records(conn, "pgscale", PROFILE)
        assert recorded.alter_system == {} and recorded.database == {("", "work_mem"): "8MB"}
        retired = server_settings.retire_database(conn, "pgscale", PROFILE, recorded.database, facts)
        assert retired is not None and retired.reset == ["work_mem"]
        server_settings.reconcile(conn, "pgscale", PROFILE, desired)
        assert pgs.database_settings(conn, None) == {} and auto_conf(conn)["work_mem"] == "8MB"
        assert server_settings.records(conn, "pgscale", PROFILE).database == {}


def test_what_cannot_be_reset_is_said_and_kept(server: localenv.Postgres) -> None:
    server.execute("CREATE ROLE app LOGIN PASSWORD 'pw-app'")
    server.execute("CREATE DATABASE app OWNER app")
    su, app = info(server, "app"), info(server, "app", "app", "pw-app")
    with connect(su) as conn:
        server_settings.reconcile(conn, "pgscale", PROFILE, {"work_mem": ("8MB", "parameters")})
        conn.execute("GRANT USAGE ON SCHEMA pgscale TO app")
        conn.execute("GRANT SELECT, DELETE, INSERT ON pgscale.managed_settings TO app")
    # The Secret now holds the application's role: it may not ALTER SYSTEM.
    with connect(app) as conn:
        recorded = server_settings.records(conn, "pgscale", PROFILE)
        facts = pgs.privileges(conn, sorted(recorded.names))
        retired = server_settings.retire_alter_system(conn, "pgscale", PROFILE, recorded.alter_system, facts)
        assert retired is not None and retired.left == ["work_mem"] and retired.reset == []
        assert "ALTER SYSTEM RESET work_mem; SELECT pg_reload_conf()" in retired.fix
        assert 'DELETE FROM "pgscale"."managed_settings" WHERE profile = \'ns/app\'' in retired.fix
        assert "no ALTER SYSTEM privilege on work_mem" in retired.why
        assert server_settings.records(conn, "pgscale", PROFILE).alter_system == {"work_mem": "8MB"}
    with connect(su) as conn:
        assert auto_conf(conn) == {"work_mem": "8MB"}


def test_claims_of_unrelated_profiles_read_nothing(postgres: Any) -> None:
    """records() of a profile with no state schema yet: empty, and nothing created."""
    with psycopg.connect(postgres.dsn(), autocommit=True) as conn:
        schema = f"none_{uuid.uuid4().hex[:6]}"
        assert server_settings.records(conn, schema, PROFILE).names == set()
        assert scalar(conn, "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema,)) == 0


def test_the_documented_alter_system_role_can_keep_settings(server: localenv.Postgres) -> None:
    """docs/databaseprofile.md's SQL for a role of the alterSystem method that is not a superuser."""
    server.execute("CREATE DATABASE app")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        if int(scalar(conn, "SHOW server_version_num")) < 150000:
            pytest.skip("GRANT ALTER SYSTEM ON PARAMETER came with PostgreSQL 15")
    for database, statement in sql_block("### For the `alterSystem` method"):
        server.execute(statement, dbname=database or "postgres")
    role = info(server, "app", "pgscale", "change-me")
    desired = {"work_mem": ("8MB", "parameters"), "shared_buffers": ("256MB", "parameters")}
    with connect(role) as conn:
        facts = pgs.privileges(conn, sorted(desired))
        assert not facts.superuser and alter_system_gaps(facts, desired) == []
        got = resolve(SettingsSpec(), secret_labels={}, cluster_found=False, facts=facts, names=desired)
        assert got.method == "alterSystem"
        report = server_settings.reconcile(conn, "pgscale", PROFILE, desired)
        assert sorted(report.applied) == ["shared_buffers", "work_mem"] and report.pending_restart == ["shared_buffers"]
        assert show(role, "work_mem") == "8MB"
        # A setting without its grant: auto falls back to database, alterSystem says what to grant.
        more = [*desired, "random_page_cost"]
        facts = pgs.privileges(conn, more)
        assert resolve(SettingsSpec(), secret_labels={}, cluster_found=False, facts=facts, names=more).method == (
            "database"
        )
