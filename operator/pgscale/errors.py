"""Errors that reconcilers raise, each mapped to one condition outcome.

A reconciler never lets an unexpected exception crash-loop the operator: the
runtime turns :class:`SpecError` and :class:`DependencyError` into a Stalled
condition that names the field and the fix, :class:`TransientError` into a
retried Reconciling state, and anything else into a Stalled ``InternalError``.
Failures are retried with exponential backoff per resource (runtime.Runtime).
"""

from __future__ import annotations


class ReconcileError(Exception):
    """Base: carries the condition reason and a message for the user."""

    reason = "Error"
    stalled = True
    retry_seconds: float | None = None

    def __init__(self, message: str, *, reason: str | None = None, retry_seconds: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        if retry_seconds is not None:
            self.retry_seconds = retry_seconds


class SpecError(ReconcileError):
    """The spec cannot work as written (something only the database reveals); fix the spec."""

    reason = "InvalidSpec"

    def __init__(self, field: str, message: str, *, reason: str | None = None) -> None:
        super().__init__(f"spec.{field}: {message}", reason=reason)
        self.field = field


class DependencyError(ReconcileError):
    """Something the resource refers to is missing or unusable; retried with backoff."""

    reason = "DependencyNotReady"


class TransientError(ReconcileError):
    """A passing failure (connection refused, lock timeout); retried soon, then with backoff."""

    reason = "TransientError"
    stalled = False
    retry_seconds = 10.0
