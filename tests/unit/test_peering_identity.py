"""The operator's identity to kopf never needs a passwd entry for its uid (a real pod runs as 65532)."""

from __future__ import annotations

import getpass

import pytest

from pgscale.leader import LeaseConfig
from pgscale.runtime import peering_identity


def test_identity_without_a_passwd_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_user() -> str:
        raise KeyError("getpwuid(): uid not found: 65532")

    monkeypatch.setattr(getpass, "getuser", no_user)
    monkeypatch.setenv("POD_NAME", "pgscale-7c9-abcde")
    assert peering_identity().startswith("pgscale-7c9-abcde/")
    monkeypatch.delenv("POD_NAME")
    assert peering_identity()
    lease = LeaseConfig(name="pgscale", namespace="ns", identity="pod-a", lease_duration=15, renew_seconds=5)
    assert peering_identity(lease) == "pod-a"
