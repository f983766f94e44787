"""The Events a reconcile records on its resource."""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    """One Kubernetes Event: a CamelCase reason, a message, and whether it is a Warning."""

    reason: str
    message: str
    warning: bool = False
