"""Which way a profile's settings reach the server, and which settings that way can carry.

Pure: the controller gathers the facts (pg.settings.privileges, the connection Secret's labels,
whether the CloudNativePG Cluster exists) and this module decides:

- `resolve`: spec.settings.method, with `auto` resolved: a CloudNativePG Cluster (clusterRef,
  or the Secret's cnpg.io/cluster label and the Cluster exists) -> cloudnativepg; else
  alterSystem when the role may ALTER SYSTEM every managed setting (and the server allows
  ALTER SYSTEM); else database. An explicit method the server cannot do stalls naming
  spec.settings.method and the fix.
- `placements`: under the database method, which settings a database may carry: `user`
  settings always, `superuser` ones when the role is a superuser or holds SET on them; the rest
  (postmaster, sighup, backend) are the server's, reported for its configuration.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from psycopg import sql

from .api.databaseprofile import AppliedMethod, SettingsSpec
from .errors import DependencyError, SpecError
from .pg.settings import Privileges, Setting

CNPG_CLUSTER_LABEL = "cnpg.io/cluster"
UNAVAILABLE = "SettingsMethodUnavailable"
CLUSTER_NOT_FOUND = "ClusterNotFound"
MAX_REASON = 512  # status.settingsMethodReason


@dataclass(frozen=True)
class Resolution:
    """The method a profile's settings go by now, why, and the Cluster for cloudnativepg."""

    method: AppliedMethod
    reason: str
    cluster: str | None = None


@dataclass(frozen=True)
class Gap:
    """Something the role or server lacks for a method, and the statement that fixes it."""

    problem: str
    fix: str


def quoted(name: str) -> str:
    """An identifier as SQL writes it (for statements shown to a person)."""
    return sql.Identifier(name).as_string(None)


def cluster_candidate(settings: SettingsSpec, secret_labels: Mapping[str, str]) -> str | None:
    """The CloudNativePG Cluster the profile points at: settings.clusterRef, else the Secret's label."""
    if settings.cluster_ref is not None:
        return settings.cluster_ref.name
    label = (secret_labels.get(CNPG_CLUSTER_LABEL) or "").strip()
    return label or None


def alter_system_gaps(facts: Privileges, names: Iterable[str]) -> list[Gap]:
    """What keeps the role from keeping these settings with ALTER SYSTEM (empty: nothing)."""
    gaps: list[Gap] = []
    who = quoted(facts.role)
    if not facts.allow_alter_system:
        gaps.append(
            Gap(
                "ALTER SYSTEM is disabled on this server (allow_alter_system = off)",
                "set allow_alter_system = on in postgresql.conf (CloudNativePG: spec.postgresql.enableAlterSystem)",
            )
        )
    if facts.superuser:
        return gaps
    if facts.version_num < 150000:
        gaps.append(Gap("only a superuser may run ALTER SYSTEM before PostgreSQL 15", f"ALTER ROLE {who} SUPERUSER"))
        return gaps
    missing = sorted(set(names) - facts.alter_system)
    if missing:
        shown = ", ".join(missing)
        few = shown if len(missing) <= 3 else f"{len(missing)} of the managed settings ({', '.join(missing[:3])}, ...)"
        gaps.append(Gap(f"no ALTER SYSTEM privilege on {few}", f"GRANT ALTER SYSTEM ON PARAMETER {shown} TO {who}"))
    if not facts.file_settings:
        gaps.append(
            Gap(
                "may not read pg_file_settings",
                f"GRANT SELECT ON pg_file_settings TO {who}; "
                f"GRANT EXECUTE ON FUNCTION pg_show_all_file_settings() TO {who}",
            )
        )
    if not facts.reload:
        gaps.append(Gap("may not run pg_reload_conf()", f"GRANT EXECUTE ON FUNCTION pg_reload_conf() TO {who}"))
    return gaps


def _problems(gaps: list[Gap]) -> str:
    return "; ".join(g.problem for g in gaps)


def _fixes(gaps: list[Gap]) -> str:
    return "; ".join(g.fix for g in gaps)


def _short(text: str) -> str:
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 1] + "…"


def resolve(
    settings: SettingsSpec,
    *,
    secret_labels: Mapping[str, str],
    cluster_found: bool,
    facts: Privileges,
    names: Iterable[str],
) -> Resolution:
    """The method for this reconcile. `cluster_found`: the Cluster `cluster_candidate` names exists.

    Raises SpecError (Stalled, SettingsMethodUnavailable) for an explicit method the server cannot
    do, and DependencyError (ClusterNotFound) for a Cluster the spec names that does not exist."""
    wanted = sorted(set(names))
    cluster = cluster_candidate(settings, secret_labels)
    label = (secret_labels.get(CNPG_CLUSTER_LABEL) or "").strip()
    method = settings.method
    if method == "cloudnativepg" or (method == "auto" and settings.cluster_ref is not None):
        field = "settings.clusterRef" if settings.cluster_ref is not None else "settings.method"
        if cluster is None:
            raise SpecError(
                field,
                "the cloudnativepg method needs a CloudNativePG Cluster: set spec.settings.clusterRef.name, or "
                f"connect through the Secret CloudNativePG generates (label {CNPG_CLUSTER_LABEL})",
                reason=UNAVAILABLE,
            )
        if not cluster_found:
            raise DependencyError(
                f"CloudNativePG Cluster {cluster!r} not found in the profile's namespace: create it, or fix "
                f"spec.{'settings.clusterRef.name' if settings.cluster_ref is not None else 'settings.method'}",
                reason=CLUSTER_NOT_FOUND,
            )
        if method == "auto":
            why = f"auto: spec.settings.clusterRef names CloudNativePG Cluster {cluster}"
        else:
            origin = (
                "spec.settings.clusterRef" if settings.cluster_ref is not None else f"the {CNPG_CLUSTER_LABEL} label"
            )
            why = f"spec.settings.method is cloudnativepg; Cluster {cluster} from {origin}"
        return Resolution("cloudnativepg", _short(why), cluster)
    if method == "auto" and label and cluster_found:
        return Resolution(
            "cloudnativepg",
            _short(
                f"auto: the connection Secret is CloudNativePG's ({CNPG_CLUSTER_LABEL}={label}), and that Cluster "
                "exists"
            ),
            label,
        )
    gaps = alter_system_gaps(facts, wanted)
    if method == "alterSystem":
        if gaps:
            raise SpecError(
                "settings.method",
                f"alterSystem is not possible for role {facts.role!r}: {_problems(gaps)}. Run as a superuser: "
                f"{_fixes(gaps)}; or set spec.settings.method to database (or auto)",
                reason=UNAVAILABLE,
            )
        return Resolution("alterSystem", "spec.settings.method")
    if method == "database":
        return Resolution("database", "spec.settings.method")
    note = f"; the Secret names CloudNativePG Cluster {label}, which was not found" if label else ""
    if not gaps and (facts.superuser or wanted):
        who = (
            f"role {facts.role} is a superuser"
            if facts.superuser
            else f"role {facts.role} holds ALTER SYSTEM on every managed setting"
        )
        return Resolution("alterSystem", _short(f"auto: {who} and the server allows ALTER SYSTEM{note}"))
    if not gaps:
        gaps = [Gap("not a superuser and no settings to manage", "")]
    return Resolution("database", _short(f"auto: role {facts.role} may not ALTER SYSTEM ({_problems(gaps)}){note}"))


Placement = Literal["database", "server", "privilege"]
DATABASE_CONTEXTS = frozenset({"user", "superuser"})


def placement(name: str, setting: Setting | None, facts: Privileges) -> Placement:
    """Where the database method puts a setting: `database` (ALTER DATABASE ... SET), `server` (a
    server-level setting: the server's configuration or the provider's parameter group), or
    `privilege` (a superuser setting this role may not set: GRANT SET ON PARAMETER, or the server)."""
    if setting is None:  # an extension's setting the server does not know yet: superusers (or SET) only
        return "database" if facts.superuser or name in facts.set else "privilege"
    if setting.context not in DATABASE_CONTEXTS:
        return "server"
    if setting.context == "superuser" and not (facts.superuser or name in facts.set):
        return "privilege"
    return "database"


def placements(known: Mapping[str, Setting], names: Iterable[str], facts: Privileges) -> dict[str, Placement]:
    """`placement` of every name."""
    return {name: placement(name, known.get(name), facts) for name in names}


def database_capable(setting: Setting | None, name: str) -> bool:
    """Whether any role could carry the setting per database (for claims of other profiles)."""
    return setting.context in DATABASE_CONTEXTS if setting is not None else "." in name
