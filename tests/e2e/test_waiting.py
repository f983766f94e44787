"""Nothing waits longer than it must: a policy created before its profile starts as soon as the
profile appears (not after its backoff), and `hack/localenv.py up` run in the background stops
everything on SIGINT or SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import localenv
import pytest

from conftest import ROOT, Kubectl, load_example, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]


def reason(kubectl: Kubectl, kind: str, name: str) -> str | None:
    conditions: list[dict[str, Any]] = kubectl.get(kind, name).get("status", {}).get("conditions", [])
    return next((c.get("reason") for c in conditions if c["type"] == "Ready"), None)


def test_policy_created_before_its_profile_starts_when_the_profile_appears(
    operator: localenv.OperatorProcess, kubectl: Kubectl, database: str, app_secret: str
) -> None:
    policy = load_example("partitionpolicy.yaml")[0]
    name = policy["metadata"]["name"]
    kubectl.apply(policy)
    wait_until(lambda: reason(kubectl, "partitionpolicy", name) == "ProfileNotFound", what="ProfileNotFound")
    time.sleep(12)  # with a 5 s base, the failures at 0, 5 and 15 s put the next retry at 35 s
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": "app"},
        "spec": {"connection": {"secretRef": {"name": app_secret}}},
    }
    kubectl.apply(profile)
    started = time.monotonic()
    wait_until(
        lambda: reason(kubectl, "partitionpolicy", name) not in ("ProfileNotFound", None),
        timeout=30,
        what="the policy to notice its profile",
        log=operator.log,
    )
    assert time.monotonic() - started < 8, "the policy waited for its backoff instead of the profile's event"


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_localenv_up_in_the_background_cleans_up(tmp_path: Path, sig: signal.Signals) -> None:
    """As `hack/localenv.py up &` in a script: SIGINT arrives ignored, SIGTERM would kill it outright."""
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "hack" / "localenv.py"), "up", "--dir", str(tmp_path / "env")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:
        lines.append(line)
        if "Ctrl-C stops everything" in line:
            break
    postgres_uri = next((ln for ln in lines if ln.startswith("# postgres: ")), "")
    assert postgres_uri, "".join(lines)
    port = int(postgres_uri.rsplit(":", 1)[1].split("/")[0])
    assert _listening(port)
    os.kill(proc.pid, sig)
    assert proc.wait(timeout=90) == 0, "".join(lines)
    assert not _listening(port), "postgres still runs after localenv up stopped"
