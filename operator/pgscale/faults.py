"""Injection points for crash tests, in the spirit of PostgreSQL 17's INJECTION_POINT.

Long, multi-step work calls ``checkpoint(name)`` between (and inside) its steps. When
``PGSCALE_FAULT_POINT`` names that point, the process kills itself with SIGKILL there,
exactly as an OOM kill or a node failure would, so tests can prove every step resumes.
Unset (always, outside tests), a checkpoint costs one dictionary lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "PGSCALE_FAULT_POINT"


def checkpoint(name: str) -> None:
    """Die here if the environment asks for it."""
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
