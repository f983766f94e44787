"""What streaming replicas need from the primary, their slots, and how far behind they are."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql


@dataclass(frozen=True)
class SlotState:
    name: str
    active: bool
    active_pid: int | None


@dataclass(frozen=True)
class Standby:
    application_name: str
    lag_bytes: int | None
    lag_seconds: float | None


def readiness_problems(conn: psycopg.Connection, user: str, wanted: int) -> list[str]:
    """What keeps the primary from serving `wanted` replicas as `user`, each with its fix."""
    out = []
    row = conn.execute("SELECT rolreplication, rolcanlogin FROM pg_roles WHERE rolname = %s", (user,)).fetchone()
    if row is None or not row[0] or not row[1]:
        out.append(
            f'role {user!r} must exist with REPLICATION and LOGIN: CREATE ROLE "{user}" WITH REPLICATION '
            "LOGIN PASSWORD '...' (the password in spec.readReplicas.replicationSecretRef)"
        )
    settings: dict[str, str] = dict(
        conn.execute(
            "SELECT name, setting FROM pg_settings WHERE name IN ('wal_level', 'max_wal_senders', "
            "'max_replication_slots')"
        ).fetchall()
    )
    out += own_role_problems(conn)
    if settings.get("wal_level") == "minimal":
        out.append("wal_level is minimal: set it to replica (needs a restart)")
    for name in ("max_wal_senders", "max_replication_slots"):
        if int(settings.get(name, 0)) < wanted:
            out.append(f"{name} is {settings.get(name)}, below the {wanted} replicas: raise it (needs a restart)")
    if not _can_read_hba(conn):
        return out  # own_role_problems named the GRANT; without the rules there is nothing more to check
    rules = conn.execute(
        "SELECT database, user_name FROM pg_hba_file_rules WHERE type IN ('host', 'hostssl', 'hostnossl') "
        "AND error IS NULL AND auth_method NOT IN ('reject')"
    ).fetchall()
    allowed = any(
        "replication" in (dbs or []) and ("all" in (users or []) or user in (users or [])) for dbs, users in rules
    )
    if not allowed:
        out.append(
            f"pg_hba.conf has no line for replication connections of {user!r}: add "
            f"'host replication {user} <replica network> scram-sha-256' and reload"
        )
    return out


def own_role_problems(conn: psycopg.Connection) -> list[str]:
    """What the profile's own role lacks to manage replicas (create slots, read pg_hba_file_rules), with the fix;
    checked first, so a missing privilege is a named condition instead of a refused statement later."""
    row = conn.execute(
        "SELECT current_user::text, rolsuper, rolreplication FROM pg_roles WHERE rolname = current_user"
    ).fetchone()
    if row is None or row[1]:
        return []
    role = sql.Identifier(str(row[0])).as_string(None)
    out = []
    if not row[2]:
        out.append(
            f"the profile's role {row[0]!r} may not create replication slots: ALTER ROLE {role} WITH "
            "REPLICATION (or connect as a superuser)"
        )
    if not _can_read_hba(conn):
        out.append(
            f"the profile's role {row[0]!r} may not read pg_hba_file_rules: GRANT SELECT ON "
            f"pg_catalog.pg_hba_file_rules TO {role}; GRANT EXECUTE ON FUNCTION "
            f"pg_catalog.pg_hba_file_rules() TO {role}"
        )
    return out


def _can_read_hba(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT has_table_privilege('pg_catalog.pg_hba_file_rules', 'SELECT') "
        "AND has_function_privilege('pg_catalog.pg_hba_file_rules()', 'EXECUTE')"
    ).fetchone()
    return bool(row and row[0])


def slots(conn: psycopg.Connection, prefix: str) -> dict[str, SlotState]:
    """This profile's slots: the prefix followed by an ordinal, nothing else (never another profile's)."""
    rows = conn.execute(
        "SELECT slot_name, active, active_pid FROM pg_replication_slots WHERE slot_type = 'physical' "
        "AND starts_with(slot_name, %s)",
        (prefix,),
    ).fetchall()
    return {str(r[0]): SlotState(str(r[0]), bool(r[1]), r[2]) for r in rows if str(r[0])[len(prefix) :].isdigit()}


def create_slot(conn: psycopg.Connection, name: str) -> None:
    """A physical slot that reserves WAL right away, so a replica's clone cannot miss any."""
    conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (name,))


def drop_slot(conn: psycopg.Connection, slot: SlotState) -> None:
    """Drop a slot, ending the walsender that still uses it (its replica is gone or going)."""
    if slot.active and slot.active_pid:
        conn.execute("SELECT pg_terminate_backend(%s)", (slot.active_pid,))
        for _ in range(50):
            row = conn.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s", (slot.name,)).fetchone()
            if row is None or not row[0]:
                break
            conn.execute("SELECT pg_sleep(0.1)")
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", (slot.name,)
    )


def standbys(conn: psycopg.Connection) -> dict[str, Standby]:
    rows = conn.execute(
        "SELECT application_name, pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint, "
        "extract(epoch FROM replay_lag) FROM pg_stat_replication"
    ).fetchall()
    return {
        str(r[0]): Standby(
            str(r[0]), int(r[1]) if r[1] is not None else None, float(r[2]) if r[2] is not None else None
        )
        for r in rows
    }
