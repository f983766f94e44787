"""`pgscale status` and `kubectl pgscale status` against the real API server and operator:
the output names every resource under its profile with the state the operator reported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ROOT, Kubectl, load_example
from pgscale import api

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

BIN = Path(sys.executable).parent
EXAMPLES = ["databaseprofile.yaml", "partitionpolicy.yaml", "retentionpolicy.yaml", "filemigration.yaml"]


def pgscale(kubeconfig: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([str(BIN / "pgscale"), "status", *args], env=env, capture_output=True, text=True, timeout=60)


def tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Heading line -> rows of its table, cut at the header's column starts (as a person reads it)."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, columns = "", list[tuple[str, int]]()
    for line in text.splitlines():
        if line.startswith("DatabaseProfile "):
            heading, columns = line, []
            out[heading] = []
        elif line.strip().startswith("KIND "):
            names = line.split()
            columns = [(n, line.index(n)) for n in names]
        elif columns and line.strip():
            cells = {}
            for i, (name, start) in enumerate(columns):
                end = columns[i + 1][1] if i + 1 < len(columns) else None
                cells[name] = line[start:end].strip()
            out[heading].append(cells)
    return out


def setup_resources(kubectl: Kubectl) -> None:
    kubectl.secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "k", "AWS_SECRET_ACCESS_KEY": "s"})
    for example in EXAMPLES:
        kubectl.run("apply", "-f", str(ROOT / "examples" / example))
    typo = load_example("partitionpolicy.yaml")[0]
    typo["metadata"]["name"] = "typo"
    typo["spec"]["table"]["name"] = "task"  # the table is "Task"
    kubectl.apply(typo)
    orphan = load_example("retentionpolicy.yaml")[0]
    orphan["metadata"]["name"] = "orphan"
    orphan["spec"]["profileRef"]["name"] = "gone"
    kubectl.apply(orphan)
    for example in EXAMPLES:
        for doc in load_example(example):
            kubectl.wait(doc["kind"].lower(), doc["metadata"]["name"], "Ready", timeout=90)
    kubectl.wait("partitionpolicy", "typo", "Stalled")
    kubectl.wait("retentionpolicy", "orphan", "Stalled")


def test_status_names_resources_and_states(
    operator: Any, control_plane: Any, kubectl: Kubectl, postgres: Any, database: str, app_secret: str
) -> None:
    setup_resources(kubectl)
    ns, kubeconfig = kubectl.namespace, control_plane.kubeconfig
    result = pgscale(kubeconfig, "-n", ns)
    assert result.returncode == 0, result.stderr
    sys.stderr.write(result.stdout)  # the sample in docs/monitoring.md comes from here
    views = tables(result.stdout)
    head = next(h for h in views if h.startswith(f"DatabaseProfile {ns}/app: "))
    assert head.startswith(
        f"DatabaseProfile {ns}/app: postgres@{postgres.host}:{postgres.port}/{database} (Secret app-db), "
        f"PostgreSQL {postgres.major}."
    )
    rows = {(r["KIND"], r["NAME"]): r for r in views[head]}
    assert list(rows) == [
        ("DatabaseProfile", "app"),
        ("PartitionPolicy", "task-by-month"),
        ("PartitionPolicy", "typo"),
        ("RetentionPolicy", "archive-completed-tasks"),
        ("FileMigration", "files-to-s3"),
    ]
    for key, row in rows.items():
        obj = kubectl.get(key[0].lower(), key[1])
        ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
        assert row["READY"] == ready["status"], row
        assert row["STATE"] == ("Failed" if key[1] == "typo" else "Current"), row
    assert rows[("DatabaseProfile", "app")]["PROGRESS"].startswith(f"PostgreSQL {postgres.major}.")
    assert rows[("PartitionPolicy", "typo")]["REASON"] == "TableNotFound"
    assert 'spec.table: table "public"."task" does not exist' in rows[("PartitionPolicy", "typo")]["MESSAGE"]
    assert rows[("RetentionPolicy", "archive-completed-tasks")]["REASON"] == "Scheduled"
    assert rows[("FileMigration", "files-to-s3")]["PROGRESS"].startswith("Completed 100.0%")
    partitions = kubectl.get("partitionpolicy", "task-by-month")["status"]["partitionCount"]
    assert rows[("PartitionPolicy", "task-by-month")]["PROGRESS"] == f"{partitions} partitions"
    assert "  settings  9 managed (from parameters)" in result.stdout
    orphans = views[f"DatabaseProfile {ns}/gone: not found; 1 resource points at it"]
    assert [(r["NAME"], r["STATE"], r["REASON"]) for r in orphans] == [("orphan", "Failed", "ProfileNotFound")]

    # -o json: the same view for scripts.
    data = json.loads(pgscale(kubeconfig, "-n", ns, "-o", "json").stdout)
    states = {(r["kind"], r["name"]): r["state"] for p in data["profiles"] for r in p["rows"]}
    assert states[("PartitionPolicy", "typo")] == "Failed" and states[("DatabaseProfile", "app")] == "Current"
    app = next(p for p in data["profiles"] if p["name"] == "app")
    assert app["database"].startswith(f"postgres@{postgres.host}:{postgres.port}/{database}")
    assert "password" not in result.stdout + json.dumps(data) and postgres.PASSWORD not in json.dumps(data)

    # -o wide: generations observed, the table, kind-specific conditions.
    wide = tables(pgscale(kubeconfig, "-n", ns, "-o", "wide").stdout)
    wide_rows = {r["NAME"]: r for r in wide[head]}
    assert wide_rows["archive-completed-tasks"]["GEN"] == "1/1"
    assert wide_rows["archive-completed-tasks"]["TABLE"] == "public.Task"

    # One profile only; every namespace; an unknown profile.
    only = pgscale(kubeconfig, "-n", ns, "app").stdout
    assert "files-to-s3" in only and "orphan" not in only
    everywhere = pgscale(kubeconfig, "-A").stdout
    assert f"DatabaseProfile {ns}/app: " in everywhere and f"DatabaseProfile {ns}/gone: " in everywhere
    missing = pgscale(kubeconfig, "-n", ns, "nope")
    assert missing.returncode == 1 and f"DatabaseProfile 'nope' not found in namespace {ns}" in missing.stderr


def test_kubectl_plugin_and_context_namespace(
    operator: Any, control_plane: Any, kubectl: Kubectl, app_secret: str, tmp_path: Path
) -> None:
    kubectl.run("apply", "-f", str(ROOT / "examples" / "databaseprofile.yaml"))
    kubectl.run("apply", "-f", str(ROOT / "examples" / "retentionpolicy.yaml"))
    kubectl.wait("retentionpolicy", "archive-completed-tasks", "Ready")
    ns = kubectl.namespace
    # The namespace of the kubeconfig's context, as kubectl would use it.
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["contexts"][0]["context"]["namespace"] = ns
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    direct = pgscale(kubeconfig)
    assert direct.returncode == 0 and f"DatabaseProfile {ns}/app: " in direct.stdout
    # kubectl finds `kubectl-pgscale` on PATH and hands it the rest of the command line.
    env = {**os.environ, "KUBECONFIG": str(kubeconfig), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    plugins = subprocess.run([str(control_plane.kubectl), "plugin", "list"], env=env, capture_output=True, text=True)
    assert str(BIN / "kubectl-pgscale") in plugins.stdout
    plugin = subprocess.run(
        [str(control_plane.kubectl), "pgscale", "status", "-n", ns], env=env, capture_output=True, text=True, timeout=60
    )
    assert plugin.returncode == 0, plugin.stderr
    assert tables(plugin.stdout) == tables(direct.stdout)
    # Someone who may read pgscale's resources but not Secrets still gets the view.
    kubectl.run("create", "serviceaccount", "viewer")
    kubectl.run(
        "create",
        "role",
        "pgscale-viewer",
        "--verb=get,list",
        "--resource=" + ",".join(f"{kind.plural}.pgscale.io" for kind in api.KINDS),
    )
    kubectl.run("create", "rolebinding", "pgscale-viewer", "--role=pgscale-viewer", f"--serviceaccount={ns}:viewer")
    viewer = control_plane.service_account_kubeconfig(ns, "viewer", tmp_path / "viewer")
    limited = pgscale(viewer, "-n", ns)
    assert limited.returncode == 0, limited.stderr
    assert f"DatabaseProfile {ns}/app: through Secret app-db (not readable)" in limited.stdout
    assert [(r["NAME"], r["STATE"]) for rows in tables(limited.stdout).values() for r in rows] == [
        ("app", "Current"),
        ("archive-completed-tasks", "Current"),
    ]
    denied = pgscale(viewer, "-A")
    assert denied.returncode == 1 and denied.stderr.startswith(
        "pgscale status: databaseprofiles.pgscale.io is forbidden"
    )
    assert "Traceback" not in denied.stderr
