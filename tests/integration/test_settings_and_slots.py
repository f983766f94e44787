"""Server-wide state on a private server: a refused value names its parameter; slots are never shared."""

from __future__ import annotations

import localenv
import psycopg
import pytest

from pgscale import server_settings
from pgscale.errors import DependencyError, SpecError
from pgscale.kube import ObjectRef
from pgscale.pg import replication
from pgscale.pg import settings as pgs
from pgscale.specs import replicas

pytestmark = pytest.mark.postgres


@pytest.fixture
def server(private_postgres: localenv.Postgres) -> localenv.Postgres:
    return private_postgres


def test_value_refused_by_the_server_names_the_parameter(server: localenv.Postgres) -> None:
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        desired = {"work_mem": ("8MB", "parameters"), "log_destination": ("nonsense", "parameters")}
        with pytest.raises(SpecError) as err:
            server_settings.reconcile(conn, "pgscale", "ns/app", desired)
        assert err.value.field == "parameters.log_destination" and "refused by the server" in err.value.message


def test_profiles_never_see_each_others_slots(server: localenv.Postgres) -> None:
    db = ObjectRef("v", "DatabaseProfile", "prod", "db", "u1")
    dbx = ObjectRef("v", "DatabaseProfile", "prod", "db-x", "u2")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        for owner in (db, dbx):
            for name in replicas.slot_names(owner, 2):
                replication.create_slot(conn, name)
        mine = replication.slots(conn, replicas.slot_prefix(db))
        assert set(mine) == set(replicas.slot_names(db, 2))
        for slot in mine.values():
            replication.drop_slot(conn, slot)
        assert set(replication.slots(conn, replicas.slot_prefix(dbx))) == set(replicas.slot_names(dbx, 2))


def test_alter_system_turned_off_is_named_and_nothing_is_written(server: localenv.Postgres) -> None:
    """PostgreSQL 17+ has allow_alter_system (CloudNativePG turns it off); before 17 there is none."""
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        assert not pgs.alter_system_disabled(conn)
        if server.major < 17:
            assert conn.execute("SELECT current_setting('allow_alter_system', true)").fetchone() == (None,)
            return
        with (server.data / "postgresql.conf").open("a") as conf:
            conf.write("allow_alter_system = off\n")
        conn.execute("SELECT pg_reload_conf()")
    with psycopg.connect(server.dsn(), autocommit=True) as conn:
        assert pgs.alter_system_disabled(conn)
        with pytest.raises(DependencyError) as err:
            server_settings.reconcile(conn, "pgscale", "ns/app", {"work_mem": ("8MB", "parameters")})
        assert err.value.reason == "AlterSystemDisabled" and "allow_alter_system = on" in err.value.message
        assert pgs.configured(conn) == {} and pgs.managed(conn, "pgscale", "ns/app") == {}
