"""Leader election's settings and flags (the election itself runs against the real API server in
tests/e2e/test_leader_election_e2e.py)."""

from __future__ import annotations

import pytest

from pgscale.cli import lease_config, parser
from pgscale.leader import LeaseConfig, _micro_time


def test_default_timing_is_consistent() -> None:
    cfg = LeaseConfig(name="pgscale", namespace="ns", identity="pod-0")
    assert (cfg.lease_duration, cfg.renew_seconds, cfg.renew_deadline) == (15.0, 5.0, 10.0)
    # The last try before the deadline ends (timed out) before the lease runs out for a standby.
    assert cfg.renew_deadline + cfg.request_timeout < cfg.lease_duration
    assert cfg.problems() == []


@pytest.mark.parametrize(("duration", "renew", "identity"), [(15, 10, "p"), (15, 0, "p"), (1, 0.5, "p"), (15, 5, "")])
def test_inconsistent_timing_is_refused(duration: float, renew: float, identity: str) -> None:
    assert LeaseConfig("l", "ns", identity, lease_duration=duration, renew_seconds=renew).problems()


def test_identity_and_namespace_come_from_the_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "pgscale-6d9f-abcde")
    monkeypatch.setenv("POD_NAMESPACE", "pgscale-system")
    cfg = lease_config(parser().parse_args(["run", "--leader-election"]))
    assert (cfg.name, cfg.namespace, cfg.identity) == ("pgscale", "pgscale-system", "pgscale-6d9f-abcde")
    monkeypatch.delenv("POD_NAME")
    args = parser().parse_args(["run", "--leader-election", "--leader-election-namespace=ops"])
    first, second = lease_config(args), lease_config(args)
    assert first.namespace == "ops" and first.identity != second.identity  # two processes on one host differ
    assert not parser().parse_args(["run"]).leader_election  # off unless asked for (the chart asks)


def test_micro_time_always_has_six_fractional_digits() -> None:
    from datetime import UTC, datetime

    assert _micro_time(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"
