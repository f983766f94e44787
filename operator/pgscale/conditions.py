"""The one place that writes conditions, for every kind.

Conventions are kstatus's (read by Flux, ``kubectl wait`` and Argo CD):
``Ready`` is always present; ``Reconciling`` and ``Stalled`` are present only
while True; ``lastTransitionTime`` changes only when a condition's status does.
Functions here are pure: they take and return lists of :class:`Condition` models.
"""

from __future__ import annotations

from datetime import UTC, datetime

from .api.common import Condition, ConditionStatus
from .redact import redact

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"
# Conditions that kstatus treats as "abnormal-true": absent unless true.
_ONLY_WHILE_TRUE = (RECONCILING, STALLED)
MAX_REASON, MAX_MESSAGE = 1024, 32768  # Condition's limits in the CRD

Conditions = list[Condition]


def now_rfc3339() -> str:
    """Current time as Kubernetes writes it (second precision, Z suffix)."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def get(conditions: Conditions, ctype: str) -> Condition | None:
    """The condition of a type, or None."""
    return next((c for c in conditions if c.type == ctype), None)


def is_true(conditions: Conditions, ctype: str) -> bool:
    """Whether a condition is present and True."""
    found = get(conditions, ctype)
    return found is not None and found.status == "True"


def set_condition(
    conditions: Conditions,
    ctype: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: str | None = None,
) -> Conditions:
    """Return conditions with one set; Reconciling/Stalled are removed instead of set False."""
    rest = [c for c in conditions if c.type != ctype]
    if ctype in _ONLY_WHILE_TRUE and status != "True":
        return rest
    old = get(conditions, ctype)
    new = Condition(
        type=ctype,
        status=status,
        reason=reason[:MAX_REASON],
        message=redact(message)[:MAX_MESSAGE],
        observed_generation=generation,
        last_transition_time=old.last_transition_time if old and old.status == status else (now or now_rfc3339()),
    )
    return [*rest, new] if old is None else [new if c is old else c for c in conditions]


def flag(conditions: Conditions, ctype: str, on: bool, reason: str, message: str, generation: int | None) -> Conditions:
    """A kind-specific condition present (True) while it applies, absent otherwise."""
    if on:
        return set_condition(conditions, ctype, "True", reason, message, generation)
    return remove(conditions, ctype)


def remove(conditions: Conditions, ctype: str) -> Conditions:
    """Conditions without one type (for kind-specific conditions that no longer apply)."""
    return [c for c in conditions if c.type != ctype]


def reconciling(conditions: Conditions, reason: str, message: str, generation: int | None) -> Conditions:
    """Work has started: Ready Unknown, Reconciling True, Stalled cleared."""
    conditions = set_condition(conditions, READY, "Unknown", reason, message, generation)
    conditions = set_condition(conditions, RECONCILING, "True", reason, message, generation)
    return set_condition(conditions, STALLED, "False", reason, "", generation)


def ready(conditions: Conditions, reason: str, message: str, generation: int | None) -> Conditions:
    """The desired state is reached: Ready True, Reconciling and Stalled cleared."""
    conditions = set_condition(conditions, READY, "True", reason, message, generation)
    conditions = set_condition(conditions, RECONCILING, "False", reason, "", generation)
    return set_condition(conditions, STALLED, "False", reason, "", generation)


def progressing(conditions: Conditions, reason: str, message: str, generation: int | None) -> Conditions:
    """Long work is under way and advancing: Ready False, Reconciling True."""
    conditions = set_condition(conditions, READY, "False", reason, message, generation)
    conditions = set_condition(conditions, RECONCILING, "True", reason, message, generation)
    return set_condition(conditions, STALLED, "False", reason, "", generation)


def stalled(conditions: Conditions, reason: str, message: str, generation: int | None) -> Conditions:
    """No progress without a change by the user: Ready False, Stalled True, Reconciling cleared."""
    conditions = set_condition(conditions, READY, "False", reason, message, generation)
    conditions = set_condition(conditions, RECONCILING, "False", reason, "", generation)
    return set_condition(conditions, STALLED, "True", reason, message, generation)


def waiting(conditions: Conditions, reason: str, message: str, generation: int | None) -> Conditions:
    """A transient failure that is retried: Ready False, Reconciling True (kstatus InProgress)."""
    return progressing(conditions, reason, message, generation)
