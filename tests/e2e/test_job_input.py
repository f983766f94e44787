"""A job pod whose input is missing falls back to the Kubernetes API; a refusal there is one clear line.

Found on the real node (issue 14, acceptance 3): with the Job's PGSCALE_JOB_INPUT renamed in a
scratch branch, the pod read the FileMigration as its ServiceAccount and crashed with a 403 traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import localenv
import pytest

pytestmark = [pytest.mark.cluster]


def test_job_without_input_and_without_rights_says_why_in_one_line(
    control_plane: localenv.ControlPlane, namespace: str, tmp_path: Path
) -> None:
    control_plane.kubectl_run("create", "serviceaccount", "job-pod", "-n", namespace, check=True)
    kubeconfig = control_plane.service_account_kubeconfig(namespace, "job-pod", tmp_path / "kubeconfig")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGSCALE_")}
    env["KUBECONFIG"] = str(kubeconfig)
    exe = Path(sys.executable).parent / "pgscale"
    result = subprocess.run(
        [str(exe), "job", "file-migration", "--namespace", namespace, "--name", "files"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    assert "no PGSCALE_JOB_INPUT in the environment" in result.stderr, result.stderr
    assert "refused (403 Forbidden)" in result.stderr, result.stderr
    assert "get on filemigrations, databaseprofiles and secrets" in result.stderr, result.stderr
