"""Which way settings go (settings_method.resolve) and which settings a database may carry (placement)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from pgscale.api.databaseprofile import DatabaseProfileSpec, SettingsSpec
from pgscale.errors import DependencyError, SpecError
from pgscale.pg.settings import Privileges, Setting, list_items, same_stored
from pgscale.server_settings import Claim, scope_of, settings_owner
from pgscale.settings_method import (
    CNPG_CLUSTER_LABEL,
    MAX_REASON,
    alter_system_gaps,
    cluster_candidate,
    database_capable,
    placement,
    placements,
    resolve,
)

SUPERUSER = Privileges(
    role="postgres",
    superuser=True,
    version_num=150010,
    allow_alter_system=True,
    file_settings=True,
    reload=True,
    database="app",
    database_owner=True,
    alter_system=frozenset({"work_mem", "shared_buffers"}),
    set=frozenset({"work_mem", "shared_buffers"}),
)
# A managed service's application role: owns its database, nothing else.
OWNER = replace(
    SUPERUSER,
    role="app",
    superuser=False,
    file_settings=False,
    reload=False,
    alter_system=frozenset(),
    set=frozenset(),
)
# A role granted what the alterSystem method needs (PostgreSQL 15+).
GRANTED = replace(OWNER, file_settings=True, reload=True, alter_system=frozenset({"work_mem", "shared_buffers"}))
NAMES = ["shared_buffers", "work_mem"]


def settings(**kw: object) -> SettingsSpec:
    return SettingsSpec.model_validate(kw)


def test_auto_picks_alter_system_for_a_superuser() -> None:
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=SUPERUSER, names=NAMES)
    assert got.method == "alterSystem" and "postgres is a superuser" in got.reason and got.cluster is None


def test_auto_picks_alter_system_for_a_role_with_every_grant() -> None:
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=GRANTED, names=NAMES)
    assert got.method == "alterSystem" and "ALTER SYSTEM on every managed setting" in got.reason


def test_auto_picks_database_for_a_role_without_alter_system_and_says_why() -> None:
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=OWNER, names=NAMES)
    assert got.method == "database"
    assert "no ALTER SYSTEM privilege on shared_buffers, work_mem" in got.reason
    assert "may not read pg_file_settings" in got.reason and "pg_reload_conf()" in got.reason
    partly = replace(GRANTED, alter_system=frozenset({"work_mem"}))  # one grant missing: not alterSystem
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=partly, names=NAMES)
    assert got.method == "database" and "no ALTER SYSTEM privilege on shared_buffers" in got.reason


def test_auto_without_settings_is_database_for_an_ordinary_role() -> None:
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=GRANTED, names=[])
    assert got.method == "database"
    assert resolve(settings(), secret_labels={}, cluster_found=False, facts=SUPERUSER, names=[]).method == (
        "alterSystem"
    )


def test_allow_alter_system_off_means_database_even_for_a_superuser() -> None:
    off = replace(SUPERUSER, version_num=170002, allow_alter_system=False)
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=off, names=NAMES)
    assert got.method == "database" and "allow_alter_system = off" in got.reason
    with pytest.raises(SpecError) as err:
        resolve(settings(method="alterSystem"), secret_labels={}, cluster_found=False, facts=off, names=NAMES)
    assert err.value.field == "settings.method" and err.value.reason == "SettingsMethodUnavailable"
    assert "enableAlterSystem" in err.value.message


def test_explicit_alter_system_without_privilege_stalls_naming_the_field_and_the_grants() -> None:
    with pytest.raises(SpecError) as err:
        resolve(settings(method="alterSystem"), secret_labels={}, cluster_found=False, facts=OWNER, names=NAMES)
    message = err.value.message
    assert message.startswith("spec.settings.method: alterSystem is not possible for role 'app'")
    assert 'GRANT ALTER SYSTEM ON PARAMETER shared_buffers, work_mem TO "app"' in message
    assert 'GRANT EXECUTE ON FUNCTION pg_reload_conf() TO "app"' in message
    assert 'GRANT SELECT ON pg_file_settings TO "app"' in message
    assert "set spec.settings.method to database (or auto)" in message
    old = replace(OWNER, version_num=140011)
    with pytest.raises(SpecError) as err:
        resolve(settings(method="alterSystem"), secret_labels={}, cluster_found=False, facts=old, names=NAMES)
    assert "only a superuser may run ALTER SYSTEM before PostgreSQL 15" in err.value.message


def test_explicit_methods_are_honoured() -> None:
    got = resolve(settings(method="database"), secret_labels={}, cluster_found=False, facts=SUPERUSER, names=NAMES)
    assert (got.method, got.reason) == ("database", "spec.settings.method")
    got = resolve(settings(method="alterSystem"), secret_labels={}, cluster_found=False, facts=GRANTED, names=NAMES)
    assert got.method == "alterSystem"
    got = resolve(
        settings(method="cloudnativepg", clusterRef={"name": "pg"}),
        secret_labels={},
        cluster_found=True,
        facts=SUPERUSER,
        names=NAMES,
    )
    assert (got.method, got.cluster) == ("cloudnativepg", "pg")


def test_cloudnativepg_from_the_secret_label_or_cluster_ref() -> None:
    labels = {CNPG_CLUSTER_LABEL: "app-db"}
    assert cluster_candidate(settings(), labels) == "app-db"
    assert cluster_candidate(settings(clusterRef={"name": "other"}), labels) == "other"
    got = resolve(settings(), secret_labels=labels, cluster_found=True, facts=SUPERUSER, names=NAMES)
    assert (got.method, got.cluster) == ("cloudnativepg", "app-db") and "cnpg.io/cluster=app-db" in got.reason
    # A CloudNativePG Secret whose Cluster is not here (copied from elsewhere): the server decides.
    got = resolve(settings(), secret_labels=labels, cluster_found=False, facts=OWNER, names=NAMES)
    assert got.method == "database" and "app-db, which was not found" in got.reason
    got = resolve(settings(clusterRef={"name": "pg"}), secret_labels={}, cluster_found=True, facts=OWNER, names=NAMES)
    assert (got.method, got.cluster) == ("cloudnativepg", "pg")


def test_a_named_cluster_that_is_missing_waits_and_a_missing_name_stalls() -> None:
    with pytest.raises(DependencyError) as dep:
        resolve(settings(clusterRef={"name": "pg"}), secret_labels={}, cluster_found=False, facts=OWNER, names=NAMES)
    assert dep.value.reason == "ClusterNotFound" and "spec.settings.clusterRef.name" in dep.value.message
    with pytest.raises(SpecError) as err:
        resolve(settings(method="cloudnativepg"), secret_labels={}, cluster_found=False, facts=OWNER, names=NAMES)
    assert err.value.field == "settings.method" and "settings.clusterRef.name" in err.value.message


def test_the_reason_fits_the_status_field() -> None:
    many = [f"custom.setting_{i:03d}" for i in range(100)]
    got = resolve(settings(), secret_labels={}, cluster_found=False, facts=OWNER, names=many)
    assert got.method == "database" and len(got.reason) <= MAX_REASON


def test_gaps_name_only_what_is_missing() -> None:
    assert alter_system_gaps(SUPERUSER, NAMES) == []
    assert alter_system_gaps(GRANTED, NAMES) == []
    assert [g.problem for g in alter_system_gaps(replace(GRANTED, reload=False), NAMES)] == [
        "may not run pg_reload_conf()"
    ]


def setting(name: str, context: str, vartype: str = "integer") -> Setting:
    return Setting(name, "0", None, vartype, None, None, (), context, False)


KNOWN = {
    "work_mem": setting("work_mem", "user"),
    "random_page_cost": setting("random_page_cost", "user", "real"),
    "log_min_duration_statement": setting("log_min_duration_statement", "superuser"),
    "shared_buffers": setting("shared_buffers", "postmaster"),
    "checkpoint_completion_target": setting("checkpoint_completion_target", "sighup", "real"),
    "log_connections": setting("log_connections", "superuser-backend", "bool"),
}


def test_placement_by_context_and_privilege() -> None:
    got = placements(KNOWN, [*KNOWN, "pg_stat_statements.track"], OWNER)
    assert got == {
        "work_mem": "database",
        "random_page_cost": "database",
        "log_min_duration_statement": "privilege",  # a superuser setting: needs GRANT SET ON PARAMETER
        "shared_buffers": "server",
        "checkpoint_completion_target": "server",
        "log_connections": "server",  # cannot be set after connection start
        "pg_stat_statements.track": "privilege",  # not loaded: superusers (or SET) only
    }
    granted = replace(OWNER, set=frozenset({"log_min_duration_statement", "pg_stat_statements.track"}))
    assert placement("log_min_duration_statement", KNOWN["log_min_duration_statement"], granted) == "database"
    assert placement("pg_stat_statements.track", None, granted) == "database"
    assert placement("log_min_duration_statement", KNOWN["log_min_duration_statement"], SUPERUSER) == "database"
    assert placement("shared_buffers", KNOWN["shared_buffers"], SUPERUSER) == "server"


def test_database_capable_for_other_profiles_claims() -> None:
    assert database_capable(KNOWN["log_min_duration_statement"], "log_min_duration_statement")
    assert not database_capable(KNOWN["shared_buffers"], "shared_buffers")
    assert database_capable(None, "pg_stat_statements.track")


def test_list_settings_compare_element_by_element() -> None:
    assert list_items('"$user", public') == ["$user", "public"]
    assert list_items('"My Schema",Public , x') == ["My Schema", "public", "x"]
    assert list_items('"a""b"') == ['a"b']
    text = setting("search_path", "user", "string")
    assert same_stored(text, '"$user", public', "$user,public")
    assert not same_stored(text, '"$user", public', "public")
    assert not same_stored(text, "MyApp", "myapp")  # not a list: compared as written
    assert same_stored(setting("work_mem", "user"), "4MB", "4MB")


def claim(name: str, created: str, params: set[str], scope: str = "") -> Claim:
    return Claim("ns", name, created, "7715008275767582304", frozenset(params), scope)


def test_database_values_of_two_databases_never_conflict() -> None:
    a = claim("a", "2026-12-01T10:00:00Z", {"work_mem"}, scope_of("app_a", None))
    b = claim("b", "2026-12-01T11:00:00Z", {"work_mem"}, scope_of("app_b", None))
    server = claim("s", "2026-12-01T09:00:00Z", {"work_mem"})
    assert settings_owner(b, [a, server]) is None
    assert settings_owner(a, [b, server]) is None
    assert settings_owner(server, [a, b]) is None  # ALTER SYSTEM and a database's values do not meet


def test_two_profiles_on_one_database_have_one_owner() -> None:
    a = claim("a", "2026-12-01T10:00:00Z", {"work_mem"}, scope_of("app", None))
    b = claim("b", "2026-12-01T11:00:00Z", {"work_mem", "random_page_cost"}, scope_of("app", None))
    conflict = settings_owner(b, [a])
    assert conflict is not None and conflict.owner == a and conflict.parameters == ["work_mem"]
    message = conflict.message("7715008275767582304")
    assert message.startswith("the values of database app on this server") and "DatabaseProfile ns/a" in message
    per_role = claim("r", "2026-12-01T11:00:00Z", {"work_mem"}, scope_of("app", "reporting"))
    assert settings_owner(per_role, [a]) is None  # ALTER ROLE reporting IN DATABASE app: its own row


def test_settings_default_is_auto() -> None:
    spec = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "s"}}})
    assert spec.settings_or_default.method == "auto"
