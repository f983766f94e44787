"""Regression (fault suite, apiserver restart): the API server unreachable in the middle of a reconcile is
a retried APIServerUnavailable, not an InternalError with a traceback. A real client against a port
nobody listens on (no mock): every request is refused, as during a kube-apiserver restart."""

from __future__ import annotations

import logging
import socket

import pytest
import urllib3
from kubernetes import client

from pgscale.controllers.base import API_UNAVAILABLE, Context, OperatorConfig, run_reconcile
from pgscale.controllers.retentionpolicy import RetentionPolicyController
from pgscale.kube import Kube


def refused_kube() -> Kube:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = client.Configuration(host=f"https://127.0.0.1:{port}")
    config.retries = 0
    return Kube(client.ApiClient(config))


def test_unreachable_api_server_mid_reconcile_is_retried_not_an_internal_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ctx = Context(kube=refused_kube(), config=OperatorConfig())
    obj = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "RetentionPolicy",
        "metadata": {"namespace": "app", "name": "tasks", "generation": 1},
        "status": {"observedGeneration": 1},
        "spec": {
            "profileRef": {"name": "app"},
            "table": {"name": "Task"},
            "ageColumn": "completedAt",
            "olderThan": "90d",
            "children": {"mode": "delete"},
        },
    }
    with caplog.at_level(logging.INFO), pytest.raises(urllib3.exceptions.HTTPError):
        run_reconcile(RetentionPolicyController(), ctx, obj)  # writing the status fails too: the runtime retries
    assert not [r for r in caplog.records if "reconcile failed" in r.getMessage() or r.exc_info]
    warnings = [r.getMessage() for r in caplog.records if API_UNAVAILABLE in r.getMessage()]
    assert warnings and "could not be reached (NewConnectionError" in warnings[0], warnings
    assert "\n" not in warnings[0]
