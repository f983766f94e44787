"""Secrets stay in Secrets, end to end: malformed connection strings of every shape go
through the real operator (text and JSON logs, info and debug), the real API server and
the real Job command, and the password shows up on no surface: the status of the profile
and of every kind referencing it, Events, operator logs, `pgscale status`, Job output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localenv
import pytest

from conftest import Kubectl, load_example, pod_env, wait_until
from malformed import CASES, PASSWORD
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.kube import ObjectRef
from pgscale.specs.builders import job_env

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

BIN = Path(sys.executable).parent
KINDS = ("databaseprofile", "partitionpolicy", "retentionpolicy", "filemigration")
# What a profile with a broken connection may say; never InternalError.
EXPECTED = {"InvalidSecret", "ConnectionFailed", "AuthenticationFailed"}


@pytest.fixture
def debug_json_operator(
    tmp_path: Path, operator_kubeconfig: Path, namespace: str
) -> Iterator[localenv.OperatorProcess]:
    """A second operator on the test's namespace that logs JSON at debug level (the session one logs text)."""
    op = localenv.OperatorProcess(
        tmp_path, operator_kubeconfig, {"PGSCALE_LOG_FORMAT": "json", "PGSCALE_LOG_LEVEL": "debug"}
    )
    try:
        yield op.start("-n", namespace)
    finally:
        op.stop()


def resources(case: str) -> list[dict[str, Any]]:
    """A profile on the case's Secret and one resource of every other kind on that profile."""
    profile = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": "DatabaseProfile",
        "metadata": {"name": case},
        "spec": {"connection": {"secretRef": {"name": case}}},
    }
    out = [profile]
    for example in ("partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"):
        obj = load_example(example)[0]
        obj["metadata"] = {"name": case}
        obj["spec"]["profileRef"]["name"] = case
        out.append(obj)
    return out


def ready(obj: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {})


def test_password_appears_nowhere(
    operator: localenv.OperatorProcess,
    debug_json_operator: localenv.OperatorProcess,
    control_plane: localenv.ControlPlane,
    kubectl: Kubectl,
    postgres: localenv.Postgres,
    database: str,
) -> None:
    cases = dict(CASES)
    # A well-formed URI to the real server with a wrong password: libpq's own error must not leak it.
    cases["wrong-password"] = {"uri": postgres.uri(database, password=PASSWORD)}
    assert len(cases) >= 15
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": f"s3-{PASSWORD}"})
    for case, data in cases.items():
        kubectl.secret(case, data)
        for obj in resources(case):
            kubectl.apply(obj)

    def settled() -> bool:
        for kind in KINDS:
            items = json.loads(kubectl.run("get", kind, "-o", "json"))["items"]
            if len(items) != len(cases) or any(ready(o).get("reason") in (None, "Reconciling") for o in items):
                return False
        return True

    wait_until(settled, timeout=180, what="every resource to report its broken connection", log=operator.log)

    surfaces: dict[str, str] = {}
    for kind in KINDS:
        items = json.loads(kubectl.run("get", kind, "-o", "json"))["items"]
        surfaces[f"status of {kind}"] = json.dumps([o["status"] for o in items])
        for obj in items:
            reason = ready(obj)["reason"]
            if kind == "databaseprofile":
                assert reason in EXPECTED, (obj["metadata"]["name"], ready(obj))
            assert reason != "InternalError", (kind, obj["metadata"]["name"], ready(obj))
    surfaces["events"] = kubectl.run("get", "events", "-o", "json")
    surfaces["text log"] = operator.log.read_text(errors="replace")
    surfaces["json debug log"] = debug_json_operator.log.read_text(errors="replace")
    assert '"level": "debug"' in surfaces["json debug log"]
    env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    for output in ("text", "wide", "json"):
        result = subprocess.run(
            [str(BIN / "pgscale"), "status", "-n", kubectl.namespace, "-o", output],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        surfaces[f"pgscale status -o {output}"] = result.stdout + result.stderr
        assert "InvalidSecret" in result.stdout

    # The Job's command, as its pod runs it: input and credentials from the environment.
    for case, data in cases.items():
        profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": case}}})
        policy = resources(case)[1]
        owner = ObjectRef("pgscale.io/v1alpha1", "PartitionPolicy", kubectl.namespace, case, "uid")
        job = {**os.environ, **pod_env(job_env(owner, policy["spec"], profile), {case: data})}
        result = subprocess.run(
            [str(BIN / "pgscale"), "job", "partition-maintenance"], env=job, capture_output=True, text=True, timeout=60
        )
        assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
        surfaces[f"job output {case}"] = result.stdout + result.stderr
    # And by hand, reading the resources through the kubeconfig.
    result = subprocess.run(
        [
            str(BIN / "pgscale"),
            "job",
            "file-migration",
            "--namespace",
            kubectl.namespace,
            "--name",
            "bad-percent-escape",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    surfaces["job output by hand"] = result.stdout + result.stderr
    assert "InvalidSecret" in surfaces["status of databaseprofile"]

    leaks = [name for name, text in surfaces.items() if PASSWORD in text]
    assert not leaks, {name: surfaces[name][surfaces[name].index(PASSWORD) - 200 :][:400] for name in leaks}
