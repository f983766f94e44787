from __future__ import annotations

from pgscale import conditions as cond
from pgscale.api.common import Condition


def the(conditions: cond.Conditions, ctype: str) -> Condition:
    found = cond.get(conditions, ctype)
    assert found is not None, ctype
    return found


def test_reconciling_then_ready_follows_kstatus() -> None:
    c = cond.reconciling([], "Reconciling", "working", 1)
    assert the(c, "Ready").status == "Unknown"
    assert cond.is_true(c, "Reconciling") and cond.get(c, "Stalled") is None
    c = cond.ready(c, "Connected", "ok", 1)
    assert [x.type for x in c] == ["Ready"]
    assert c[0].status == "True" and c[0].observed_generation == 1


def test_stalled_clears_reconciling_and_sets_ready_false() -> None:
    c = cond.reconciling([], "Reconciling", "", 2)
    c = cond.stalled(c, "SecretNotFound", "Secret 'x' not found", 2)
    assert cond.get(c, "Reconciling") is None
    assert the(c, "Stalled").reason == "SecretNotFound"
    assert the(c, "Ready").status == "False"


def test_transition_time_changes_only_with_status() -> None:
    c = cond.set_condition([], "Ready", "False", "A", "a", 1, now="2026-01-01T00:00:00Z")
    c = cond.set_condition(c, "Ready", "False", "B", "b", 2, now="2026-01-02T00:00:00Z")
    assert c[0].last_transition_time == "2026-01-01T00:00:00Z" and c[0].reason == "B"
    c = cond.set_condition(c, "Ready", "True", "C", "c", 2, now="2026-01-03T00:00:00Z")
    assert c[0].last_transition_time == "2026-01-03T00:00:00Z"


def test_other_conditions_are_kept_in_place() -> None:
    c = cond.set_condition([], "RestartRequired", "True", "Pending", "x", 1)
    c = cond.ready(c, "Ok", "", 1)
    assert [x.type for x in c] == ["RestartRequired", "Ready"]


def test_flag_sets_while_true_and_removes_otherwise() -> None:
    c = cond.flag([], "Conflict", True, "Both", "two owners", 1)
    assert cond.is_true(c, "Conflict")
    assert cond.flag(c, "Conflict", False, "Both", "", 2) == []


def test_conditions_go_out_as_the_crd_has_them() -> None:
    c = cond.stalled([], "SecretNotFound", "x" * 40000, 3)
    assert [x.type for x in c] == ["Ready", "Stalled"]
    assert c[1].wire() == {
        "type": "Stalled",
        "status": "True",
        "observedGeneration": 3,
        "lastTransitionTime": c[1].last_transition_time,
        "reason": "SecretNotFound",
        "message": "x" * cond.MAX_MESSAGE,
    }
