"""Keeping a server's settings as a DatabaseProfile asks: validate all, apply, reset, report.

Two methods live here (settings_method picks one): `reconcile` keeps them with ALTER SYSTEM,
`reconcile_database` keeps the ones a database may carry with ALTER DATABASE (or ALTER ROLE
... IN DATABASE) and reports the server-level rest. `retire_*` undoes what a method that is no
longer in use had set. Each raises SpecError naming the parameter when a value is invalid
(nothing is applied then).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import settings_method
from .api.databaseprofile import ParameterStatus
from .errors import DependencyError, SpecError
from .pg import settings as pgs
from .pg.connection import ConnInfo
from .settings_method import UNAVAILABLE, quoted


@dataclass
class SettingsReport:
    """What changed and how the server runs now."""

    parameters: list[ParameterStatus] = field(default_factory=list)
    pending_restart: list[str] = field(default_factory=list)
    overridden: dict[str, str] = field(default_factory=dict)  # name -> source that wins over ALTER SYSTEM
    applied: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)
    # Not applied by this method and not what the server runs: name -> desired value, to be set elsewhere.
    external: dict[str, str] = field(default_factory=dict)
    privileged: list[str] = field(default_factory=list)  # of external: superuser settings GRANT SET would allow
    statement: str = "ALTER SYSTEM"  # how values were written (Events)
    overriding: str = "ALTER SYSTEM"  # what a source that keeps other values wins over (ParametersOverridden)


def scope_of(database: str, role: str | None) -> str:
    """The scope of the database method's values (Claim.scope)."""
    return f"database {database}" + (f" for role {role}" if role else "")


def field_of(name: str, source: str) -> str:
    """The spec field a desired value came from, for error messages."""
    return f"parameters.{name}" if source == "parameters" else source


def reconcile(
    conn: psycopg.Connection, state_schema: str, profile: str, desired: dict[str, tuple[str, str]]
) -> SettingsReport:
    """Make the server's ALTER SYSTEM settings exactly `desired` (name -> (value, source))."""
    values = validated(conn, desired)
    report = SettingsReport()
    try:
        pgs.ensure_managed(conn, state_schema)
        before = pgs.managed(conn, state_schema, profile)
        current = pgs.configured(conn)
        known = pgs.describe(conn, sorted(set(values) | set(before)))
        for name, value in values.items():
            if pgs.same(known.get(name), current.get(name), value):
                continue
            if name in before and pgs.same(known.get(name), before[name], value):
                report.corrected.append(name)  # we had set it; someone changed it by hand
            else:
                report.applied.append(name)
            try:
                pgs.alter_system(conn, name, value)
            except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject) as exc:
                # Values pg_settings cannot describe (strings, settings of extensions not loaded).
                if report.applied[:-1] or report.corrected:
                    pgs.reload(conn)  # what was written before this one is consistent: apply it
                raise SpecError(
                    field_of(name, desired[name][1]),
                    f"{name} = {value!r} was refused by the server: {str(exc).strip()}",
                    reason="InvalidParameter",
                ) from exc
        for name in sorted(set(before) - set(values)):
            if name in current:
                pgs.alter_system(conn, name, None)
            report.reset.append(name)
        if report.applied or report.corrected or report.reset:
            pgs.reload(conn)
        pgs.remember(conn, state_schema, profile, values)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DependencyError(
            f"role {conn.info.user!r} may not change server settings ({str(exc).strip()}); make it a superuser, "
            "or GRANT ALTER SYSTEM ON PARAMETER ... TO it (PostgreSQL 15+), plus pg_read_all_settings",
            reason="InsufficientPrivilege",
        ) from exc
    running = pgs.effective(conn, sorted(values))
    for name, (value, source) in sorted(desired.items()):
        now = running.get(name)
        entry = ParameterStatus(name=name, desired=value, source=source, pending_restart=False)
        if now is not None:
            entry.effective = now.shown
            entry.pending_restart = now.pending_restart
            if now.pending_restart:
                report.pending_restart.append(name)
            elif not pgs.same(known.get(name), now.raw, value):  # raw is in the setting's own unit
                report.overridden[name] = now.source
        report.parameters.append(entry)
    return report


def validated(conn: psycopg.Connection, desired: dict[str, tuple[str, str]]) -> dict[str, str]:
    """name -> value, once every value passed pg_settings' description; SpecError names the first bad one."""
    values = {name: value for name, (value, _) in desired.items()}
    bad = pgs.problems(conn, values)
    if bad:
        name = sorted(bad)[0]
        others = f" ({len(bad) - 1} more: {', '.join(sorted(bad)[1:])})" if len(bad) > 1 else ""
        raise SpecError(
            field_of(name, desired[name][1]),
            f"{name} {bad[name]}; nothing was applied{others}",
            reason="InvalidParameter",
        )
    return values


def database_statement(database: str, role: str | None) -> str:
    """ALTER DATABASE "app" or ALTER ROLE "r" IN DATABASE "app", for Events and messages."""
    target = f"ALTER DATABASE {quoted(database)}"
    return target if role is None else f"ALTER ROLE {quoted(role)} IN DATABASE {quoted(database)}"


def placed(
    conn: psycopg.Connection, desired: dict[str, tuple[str, str]], facts: pgs.Privileges
) -> dict[str, settings_method.Placement]:
    """Where the database method puts each desired setting (settings_method.placement)."""
    return settings_method.placements(pgs.describe(conn, sorted(desired)), desired, facts)


def _write_database(
    conn: psycopg.Connection, database: str, name: str, value: str, role: str | None, s: pgs.Setting | None
) -> None:
    if (s is None or s.vartype == "string") and pgs.listed(value):
        try:  # a list setting (search_path): one literal per element
            pgs.alter_database(conn, database, name, pgs.list_items(value), role)
            return
        except psycopg.errors.InvalidParameterValue:
            pass  # not a list setting ("takes only one argument"): the value is one literal
    pgs.alter_database(conn, database, name, value, role)


def reconcile_database(
    conn: psycopg.Connection,
    info: ConnInfo,
    *,
    state_schema: str,
    profile: str,
    desired: dict[str, tuple[str, str]],
    facts: pgs.Privileges,
    role: str | None,
) -> SettingsReport:
    """Make this database's own values (ALTER DATABASE ... SET, or ALTER ROLE <role> IN DATABASE ... SET)
    exactly the part of `desired` a database may carry; report the server-level rest, unapplied.

    `effective` is what a new session sees (this session keeps the values it started with)."""
    values = validated(conn, desired)
    database = facts.database
    scope = role or ""
    records = (
        pgs.managed_database(conn, state_schema, profile)
        if pgs.records_readable(conn, state_schema, pgs.MANAGED_DATABASE)
        else {}
    )
    known = pgs.describe(conn, sorted(set(values) | {name for _, name in records}))
    where = settings_method.placements(known, values, facts)
    wanted = {name: value for name, value in values.items() if where[name] == "database"}
    keep = {(scope, name): value for name, value in wanted.items()}
    stale = sorted(k for k in records if k not in keep)
    if role is not None and wanted and not pgs.role_exists(conn, role):
        raise SpecError(
            "settings.role",
            f"role {role!r} does not exist on this server: create it, or fix spec.settings.role",
            reason="RoleNotFound",
        )
    if not facts.database_owner and ((role is None and wanted) or any(r == "" for r, _ in stale)):
        raise SpecError(
            "settings.method",
            f"the database method needs ALTER DATABASE {quoted(database)} ... SET, which only the database's owner "
            f"or a superuser may run, and role {facts.role!r} is neither. Run as a superuser: ALTER DATABASE "
            f"{quoted(database)} OWNER TO {quoted(facts.role)}; or connect as the owner",
            reason=UNAVAILABLE,
        )
    report = SettingsReport(
        statement=database_statement(database, role), overriding=f"{database_statement(database, role)} ... SET"
    )
    try:
        if wanted:
            pgs.ensure_managed_database(conn, state_schema)
        current = pgs.database_settings(conn, role)
        for name, value in wanted.items():
            s = known.get(name)
            if pgs.same_stored(s, current.get(name), value):
                continue
            if (scope, name) in records and pgs.same_stored(s, records[(scope, name)], value):
                report.corrected.append(name)  # we had set it; someone changed it by hand
            else:
                report.applied.append(name)
            try:
                _write_database(conn, database, name, value, role, s)
            except (psycopg.errors.InvalidParameterValue, psycopg.errors.UndefinedObject) as exc:
                raise SpecError(
                    field_of(name, desired[name][1]),
                    f"{name} = {value!r} was refused by the server: {str(exc).strip()}",
                    reason="InvalidParameter",
                ) from exc
        stored: dict[str, dict[str, str]] = {}
        for r, name in stale:
            if r and not pgs.role_exists(conn, r):  # dropped, and its values with it
                report.reset.append(name)
                continue
            if r not in stored:
                stored[r] = pgs.database_settings(conn, r or None)
            if name in stored[r]:
                pgs.alter_database(conn, database, name, None, r or None)
            report.reset.append(name)
        if wanted or records:
            pgs.remember_database(conn, state_schema, profile, keep)
    except psycopg.errors.InsufficientPrivilege as exc:
        if role is None or role == facts.role:
            raise
        raise SpecError(
            "settings.role",
            f"role {facts.role!r} may not set the defaults of role {role!r} ({str(exc).strip()}): connect as "
            f"{role!r}, or give {facts.role!r} CREATEROLE (and, from PostgreSQL 16, ADMIN OPTION on {role!r}), or "
            "remove spec.settings.role",
            reason=UNAVAILABLE,
        ) from exc
    names = sorted(values)
    own = role is None or role == facts.role
    # Server-level values are the same in every session; the database's reach new sessions only.
    running = pgs.session_effective(info, names) if own and (wanted or stale) else pgs.effective(conn, names)
    theirs = {} if own else pgs.database_settings(conn, role)  # what the role's new sessions start with
    for name, (value, source) in sorted(desired.items()):
        s, now = known.get(name), running.get(name)
        entry = ParameterStatus(name=name, desired=value, source=source, pending_restart=False)
        entry.applied = where[name] == "database"
        if entry.applied and not own:
            entry.effective = theirs.get(name) or (now.shown if now else None)
        elif now is not None:
            entry.effective = now.shown
            matches = pgs.same_stored(s, now.raw, value)
            if entry.applied:
                if not matches:
                    report.overridden[name] = now.source
            elif not matches:  # pgscale applied nothing here: not its restart to ask for (pendingRestart says it)
                entry.pending_restart = now.pending_restart
                report.external[name] = value
                if where[name] == "privilege":
                    report.privileged.append(name)
        report.parameters.append(entry)
    return report


@dataclass(frozen=True)
class Retired:
    """What a method no longer in use had set: reset now, or left, why, and what a person can run."""

    method: str
    reset: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)
    why: str = ""
    fix: str = ""


@dataclass(frozen=True)
class Records:
    """What this profile had set, by method (from the state schema; empty when this role cannot read it)."""

    alter_system: dict[str, str]
    database: dict[tuple[str, str], str]  # (role or '', name) -> value

    @property
    def names(self) -> set[str]:
        return set(self.alter_system) | {name for _, name in self.database}


def records(conn: psycopg.Connection, state_schema: str, profile: str) -> Records:
    """This profile's records of both methods."""
    alter = pgs.managed(conn, state_schema, profile) if pgs.records_readable(conn, state_schema, pgs.MANAGED) else {}
    database = (
        pgs.managed_database(conn, state_schema, profile)
        if pgs.records_readable(conn, state_schema, pgs.MANAGED_DATABASE)
        else {}
    )
    return Records(alter, database)


def _forget(state_schema: str, table: str, profile: str) -> str:
    """The statement that makes pgscale forget a profile's records (for a person to run)."""
    return (
        sql.SQL("DELETE FROM {}.{} WHERE profile = {}")
        .format(sql.Identifier(state_schema), sql.Identifier(table), sql.Literal(profile))
        .as_string(None)
    )


def retire_alter_system(
    conn: psycopg.Connection, state_schema: str, profile: str, recorded: dict[str, str], facts: pgs.Privileges
) -> Retired | None:
    """Reset what the alterSystem method had set (another method keeps the settings now)."""
    if not recorded:
        return None
    names = sorted(recorded)
    gaps = settings_method.alter_system_gaps(facts, names)
    if gaps:
        resets = "; ".join(f"ALTER SYSTEM RESET {n}" for n in names)
        return Retired(
            "alterSystem",
            left=names,
            why="; ".join(g.problem for g in gaps),
            fix=(
                f"as a superuser run {resets}; SELECT pg_reload_conf(); then, as role {facts.role!r}, "
                f"{_forget(state_schema, pgs.MANAGED, profile)} (or grant what is missing: "
                f"{'; '.join(g.fix for g in gaps)})"
            ),
        )
    current = pgs.configured(conn)
    for name in names:
        if name in current:
            pgs.alter_system(conn, name, None)
    pgs.reload(conn)
    pgs.remember(conn, state_schema, profile, {})
    return Retired("alterSystem", reset=names)


def retire_database(
    conn: psycopg.Connection,
    state_schema: str,
    profile: str,
    recorded: dict[tuple[str, str], str],
    facts: pgs.Privileges,
) -> Retired | None:
    """Reset what the database method had set (another method keeps the settings now)."""
    if not recorded:
        return None
    reset: list[str] = []
    left: dict[tuple[str, str], str] = {}
    refused = ""
    stored: dict[str, dict[str, str]] = {}
    for (r, name), value in sorted(recorded.items()):
        if r and not pgs.role_exists(conn, r):
            reset.append(name)
            continue
        if r not in stored:
            stored[r] = pgs.database_settings(conn, r or None)
        if name not in stored[r]:
            reset.append(name)
            continue
        try:
            pgs.alter_database(conn, facts.database, name, None, r or None)
            reset.append(name)
        except psycopg.errors.InsufficientPrivilege as exc:
            left[(r, name)] = value
            refused = str(exc).strip()
    pgs.remember_database(conn, state_schema, profile, left)
    if not left:
        return Retired("database", reset=sorted(set(reset)))
    resets = "; ".join(f"{database_statement(facts.database, r or None)} RESET {n}" for r, n in sorted(left))
    return Retired(
        "database",
        reset=sorted(set(reset)),
        left=sorted({n for _, n in left}),
        why=f"the server refused: {refused}",
        fix=(
            f"as the database's owner or a superuser run {resets}; then, as role {facts.role!r}, "
            f"{_forget(state_schema, pgs.MANAGED_DATABASE, profile)}"
        ),
    )


@dataclass(frozen=True)
class Claim:
    """A DatabaseProfile that keeps server-wide settings on a server (by its system identifier)."""

    namespace: str
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339, so it sorts as text)
    system_identifier: str
    parameters: frozenset[str]
    # What the parameters belong to: "" the server (ALTER SYSTEM, a CloudNativePG Cluster), or one
    # database (and role) for the database method, whose values never meet another database's.
    scope: str = ""

    @property
    def order(self) -> tuple[str, str, str]:
        """Earlier first: by creationTimestamp, then name (then namespace, for a total order)."""
        return (self.created, self.name, self.namespace)


@dataclass(frozen=True)
class Conflict:
    """Another profile owns this server's settings: what to say, and which field of ours it is about."""

    owner: Claim
    parameters: list[str]  # ours that the owner sets too, else all of ours

    def message(self, system_identifier: str) -> str:
        if self.owner.scope:
            return (
                f"the values of {self.owner.scope} on this server (system identifier {system_identifier}) are kept "
                f"by DatabaseProfile {self.owner.namespace}/{self.owner.name}, created earlier; this profile would "
                f"change {', '.join(self.parameters)} there too, so it applies nothing (two owners would set them "
                "back and forth). Keep one profile's values per database (and settings.role): remove them from "
                f"this one (parameters, tier, resources), or from {self.owner.namespace}/{self.owner.name}"
            )
        return (
            f"the server-wide settings of this server (system identifier {system_identifier}) are kept by "
            f"DatabaseProfile {self.owner.namespace}/{self.owner.name}, created earlier; this profile would "
            f"change {', '.join(self.parameters)} there too, so it applies nothing (two owners would set them "
            "back and forth). Set server parameters in one profile per server: remove them from this one "
            f"(parameters, tier, resources), or from {self.owner.namespace}/{self.owner.name}; or give this one "
            "settings.method: database (values for its own database only)"
        )


def settings_owner(me: Claim, others: list[Claim]) -> Conflict | None:
    """The earliest other profile setting parameters in my scope on my server, if it is earlier than me.

    ALTER SYSTEM (and a CloudNativePG Cluster's parameters) are server-wide: one profile per server
    owns them, the earliest, so two profiles never undo each other's values. Values of the database
    method belong to one database (and role): one owner per database, never in conflict with
    another database's or with the server's."""
    if not me.parameters:
        return None
    rivals = [
        o
        for o in others
        if o.system_identifier == me.system_identifier
        and o.scope == me.scope
        and o.parameters
        and (o.namespace, o.name) != (me.namespace, me.name)
    ]
    if not rivals:
        return None
    owner = min(rivals, key=lambda c: c.order)
    if owner.order > me.order:
        return None
    shared = sorted(me.parameters & owner.parameters)
    return Conflict(owner, shared or sorted(me.parameters))


class DriftEvents:
    """At most one DriftCorrected Event per profile and parameter per interval; corrections still happen."""

    def __init__(self, interval_seconds: float = 600.0) -> None:
        self.interval = interval_seconds
        self._last: dict[tuple[str, str], float] = {}

    def due(self, profile: str, names: list[str], now: float) -> list[str]:
        """The names to mention in an Event now, remembering that they were."""
        out = [n for n in names if now - self._last.get((profile, n), float("-inf")) >= self.interval]
        for name in out:
            self._last[(profile, name)] = now
        return out

    def forget(self, profile: str) -> None:
        """The profile is gone."""
        for key in [k for k in self._last if k[0] == profile]:
            del self._last[key]
