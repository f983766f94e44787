"""Keeping a server's settings as a DatabaseProfile asks: validate all, apply, reset, report.

Runs against one connection; raises SpecError naming the parameter when a value is
invalid (nothing is applied then), DependencyError when the role may not ALTER SYSTEM.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import psycopg

from .api.databaseprofile import ParameterStatus
from .errors import DependencyError, SpecError
from .pg import settings as pgs


@dataclass
class SettingsReport:
    """What changed and how the server runs now."""

    parameters: list[ParameterStatus] = field(default_factory=list)
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


@dataclass(frozen=True)
class Claim:
    """A DatabaseProfile that keeps server-wide settings on a server (by its system identifier)."""

    namespace: str
    name: str
    created: str  # metadata.creationTimestamp (RFC 3339, so it sorts as text)
    system_identifier: str
    parameters: frozenset[str]

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
        return (
            f"the server-wide settings of this server (system identifier {system_identifier}) are kept by "
            f"DatabaseProfile {self.owner.namespace}/{self.owner.name}, created earlier; this profile would "
            f"change {', '.join(self.parameters)} there too, so it applies nothing (two owners would set them "
            "back and forth). Set server parameters in one profile per server: remove them from this one "
            f"(parameters, tier, resources), or from {self.owner.namespace}/{self.owner.name}"
        )


def settings_owner(me: Claim, others: list[Claim]) -> Conflict | None:
    """The earliest other profile setting server-wide parameters on my server, if it is earlier than me.

    Every setting pgscale writes is server-wide (ALTER SYSTEM); one profile per server owns them,
    the earliest, so two profiles never undo each other's values."""
    if not me.parameters:
        return None
    rivals = [
        o
        for o in others
        if o.system_identifier == me.system_identifier
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
