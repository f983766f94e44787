"""One owner of a server's settings: the earliest profile that sets any, per system identifier."""

from __future__ import annotations

from pgscale.server_settings import Claim, DriftEvents, settings_owner

SERVER, OTHER_SERVER = "7715008275767582304", "7715008275767582999"


def claim(ns: str, name: str, created: str, params: set[str], server: str = SERVER) -> Claim:
    return Claim(ns, name, created, server, frozenset(params))


def test_the_later_profile_yields_to_the_earlier_one_naming_it_and_the_parameter() -> None:
    first = claim("team-a", "app", "2026-12-01T10:00:00Z", {"work_mem", "shared_buffers"})
    later = claim("team-b", "reporting", "2026-12-01T11:00:00Z", {"work_mem"})
    conflict = settings_owner(later, [first, later])
    assert conflict is not None and conflict.owner == first and conflict.parameters == ["work_mem"]
    message = conflict.message(SERVER)
    assert "DatabaseProfile team-a/app" in message and "work_mem" in message and SERVER in message
    assert settings_owner(first, [first, later]) is None  # the owner goes on


def test_same_creation_second_is_decided_by_name() -> None:
    a = claim("z", "alpha", "2026-12-01T10:00:00Z", {"work_mem"})
    b = claim("a", "beta", "2026-12-01T10:00:00Z", {"work_mem"})
    assert settings_owner(a, [b]) is None
    conflict = settings_owner(b, [a])
    assert conflict is not None and conflict.owner == a


def test_disjoint_parameters_still_have_one_owner() -> None:
    first = claim("ns", "a", "2026-12-01T10:00:00Z", {"work_mem"})
    later = claim("ns", "b", "2026-12-01T11:00:00Z", {"log_min_duration_statement", "random_page_cost"})
    conflict = settings_owner(later, [first])
    assert conflict is not None and conflict.parameters == ["log_min_duration_statement", "random_page_cost"]


def test_no_conflict_on_other_servers_or_without_server_settings() -> None:
    first = claim("ns", "a", "2026-12-01T10:00:00Z", {"work_mem"})
    assert settings_owner(claim("ns", "b", "2026-12-02T00:00:00Z", {"work_mem"}, OTHER_SERVER), [first]) is None
    assert settings_owner(claim("ns", "b", "2026-12-02T00:00:00Z", set()), [first]) is None  # monitoring only
    assert (
        settings_owner(
            claim("ns", "b", "2026-12-02T00:00:00Z", {"work_mem"}), [claim("ns", "a", "2026-12-01T00:00:00Z", set())]
        )
        is None
    )


def test_the_earliest_of_several_owners_is_named() -> None:
    me = claim("ns", "c", "2026-12-03T00:00:00Z", {"work_mem"})
    others = [
        claim("ns", "b", "2026-12-02T00:00:00Z", {"work_mem"}),
        claim("ns", "a", "2026-12-01T00:00:00Z", {"work_mem"}),
    ]
    conflict = settings_owner(me, others)
    assert conflict is not None and conflict.owner.name == "a"


def test_drift_events_are_rate_limited_per_parameter() -> None:
    events = DriftEvents(600.0)
    assert events.due("ns/app", ["work_mem"], now=0.0) == ["work_mem"]
    assert events.due("ns/app", ["work_mem", "random_page_cost"], now=10.0) == ["random_page_cost"]
    assert events.due("ns/other", ["work_mem"], now=10.0) == ["work_mem"]  # per profile
    assert events.due("ns/app", ["work_mem"], now=599.0) == []
    assert events.due("ns/app", ["work_mem"], now=600.0) == ["work_mem"]
