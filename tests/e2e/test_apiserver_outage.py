"""An API server outage is logged as one line per retry, never a traceback, and the operator
carries on by itself when the API server is back."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import localenv
import pytest
import yaml

from conftest import started_control_plane, wait_until

pytestmark = pytest.mark.cluster

OUTAGE_SECONDS = 25


@pytest.fixture
def own_control_plane(tmp_path: Path) -> Iterator[localenv.ControlPlane]:
    """A control plane of the test's own: its API server is killed and started again."""
    with started_control_plane(tmp_path / "cp") as cp:
        yield cp


def test_outage_is_logged_in_one_line_per_retry(tmp_path: Path, own_control_plane: localenv.ControlPlane) -> None:
    cp = own_control_plane
    cp.kubectl_run("create", "namespace", "outage", check=True)
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app", "namespace": "outage"},
        "spec": {"connection": {"secretRef": {"name": "missing"}}},
    }
    cp.kubectl_run("apply", "-f", "-", input=yaml.safe_dump(profile), check=True)
    op = localenv.OperatorProcess(tmp_path, cp.kubeconfig, {"PGSCALE_STALLED_RETRY_SECONDS": "1"})
    op.start("--all-namespaces", "--workers", "1")
    try:
        wait_until(lambda: "SecretNotFound" in op.log.read_text(), what="the first reconcile", log=op.log)
        api = cp.procs[1]
        before = len(op.log.read_text())
        os.killpg(api.pid, signal.SIGKILL)
        api.wait(10)
        time.sleep(OUTAGE_SECONDS)
        cp.procs[1] = localenv._spawn(list(api.args), cp.dir / "kube-apiserver.log")  # type: ignore[arg-type]
        wait_until(lambda: cp.kubectl_run("get", "ns", "outage").returncode == 0, timeout=120, what="API server back")
        mark = len(op.log.read_text())
        cp.kubectl_run("annotate", "databaseprofile", "app", "-n", "outage", "x=1", check=True)
        wait_until(
            lambda: "SecretNotFound" in op.log.read_text()[mark:],
            timeout=90,
            what="a reconcile after the outage",
            log=op.log,
        )
        during = op.log.read_text()[before:mark]
    finally:
        op.stop()
    assert "Kubernetes API unreachable" in during, during[-3000:]
    assert "Traceback" not in during, during[-5000:]
