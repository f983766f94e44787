"""Keeping a server's settings as a DatabaseProfile asks: validate all, apply, reset, report.

Runs against one connection; raises SpecError naming the parameter when a value is
invalid (nothing is applied then), DependencyError when the role may not ALTER SYSTEM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import psycopg

from .errors import DependencyError, SpecError
from .pg import settings as pgs


@dataclass
class SettingsReport:
    """What changed and how the server runs now."""

    parameters: list[dict[str, Any]] = field(default_factory=list)
    pending_restart: list[str] = field(default_factory=list)
    overridden: dict[str, str] = field(default_factory=dict)  # name -> source that wins over ALTER SYSTEM
    applied: list[str] = field(default_factory=list)
    corrected: list[str] = field(default_factory=list)
    reset: list[str] = field(default_factory=list)


def field_of(name: str, source: str) -> str:
    """The spec field a desired value came from, for error messages."""
    return f"parameters.{name}" if source == "parameters" else source


def reconcile(
    conn: psycopg.Connection, state_schema: str, profile: str, desired: dict[str, tuple[str, str]]
) -> SettingsReport:
    """Make the server's ALTER SYSTEM settings exactly `desired` (name -> (value, source))."""
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
        entry: dict[str, Any] = {"name": name, "desired": value, "source": source, "pendingRestart": False}
        if now is not None:
            entry["effective"] = now.shown
            entry["pendingRestart"] = now.pending_restart
            if now.pending_restart:
                report.pending_restart.append(name)
            elif not pgs.same(known.get(name), now.raw, value):  # raw is in the setting's own unit
                report.overridden[name] = now.source
        report.parameters.append(entry)
    return report
