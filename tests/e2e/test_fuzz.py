"""Property-based fuzzing of specs (issue 11, acceptance 2): schema-valid but hostile specs of
every kind (tests/fuzzspecs.py, derived from crds/), applied in bulk with server-side apply to
a real kube-apiserver; what it accepts is reconciled by the operator against a real Postgres.

Every accepted resource must have a condition within 60 s, none may be InternalError, and the
operator's log must hold no Traceback. What the API server rejects (CEL rules the strategies
do not model, mostly) is counted, not an error. Seeded: PGSCALE_FUZZ_SEED and
PGSCALE_FUZZ_SPECS reproduce or widen a run; the summary line prints both.

A control plane, Postgres and operator of this module's own: hostile profiles change server
settings, and no other test's operator should see (or be slowed by) hundreds of resources.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest
import yaml

from conftest import ROOT, seed_tasks, started_control_plane
from fuzzspecs import generate_isolated
from pgscale import api

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]

SEED = int(os.environ.get("PGSCALE_FUZZ_SEED", "20261203"))
SPECS = int(os.environ.get("PGSCALE_FUZZ_SPECS", "1000"))
NAMESPACES = 4
CONDITION_WITHIN = 60.0
# Next to the sample application's tables: names at the 63-byte limit (partition and shadow names
# derived from them overflow it) and a table without a primary key, both with a timestamp column.
HOSTILE_TABLES = f"""
CREATE TABLE "{"x" * 63}" (id bigint PRIMARY KEY, "createdAt" timestamptz NOT NULL DEFAULT now(), data text);
CREATE TABLE "a$b" ("createdAt" timestamptz, "completedAt" timestamptz, data bytea, id text);
INSERT INTO "{"x" * 63}" (id, "createdAt") SELECT g, now() - g * interval '1 day' FROM generate_series(1, 50) g;
"""
# Failures known and fixed on another branch, to be counted and printed apart until it is merged
# (label -> text of the message); not failed here.
KNOWN_ELSEWHERE: dict[str, str] = {}  # none left: every failure the suite found so far is fixed
PLURALS = {k.name: k.plural for k in api.KINDS}


@pytest.fixture(scope="module")
def fuzz_env(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[localenv.ControlPlane, localenv.Postgres, Path]]:
    workdir = tmp_path_factory.mktemp("fuzz")
    server = localenv.Postgres(workdir, name="fuzz-postgres")
    try:
        server.start()
        with started_control_plane(workdir) as cp:
            yield cp, server, workdir
    finally:
        server.stop()


def fixtures(namespace: str, server: localenv.Postgres, dbname: str) -> list[dict[str, Any]]:
    """What the fuzzed specs may refer to in a namespace: a working profile and Secrets, usable or not."""

    def secret(name: str, data: dict[str, str]) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace},
            "stringData": data,
        }

    def profile(name: str, secret_name: str) -> dict[str, Any]:
        return {
            "apiVersion": "pgscale.io/v1alpha1",
            "kind": "DatabaseProfile",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"connection": {"secretRef": {"name": secret_name}}},
        }

    return [
        secret("app-db", {"uri": server.uri(dbname)}),
        secret("wrong-password", {"uri": server.uri(dbname, password="not-the-password")}),
        secret("no-keys", {"host": server.host}),
        secret("s3-credentials", {"AWS_ACCESS_KEY_ID": "fuzz", "AWS_SECRET_ACCESS_KEY": "fuzz-secret"}),
        profile("app", "app-db"),
        profile("broken-profile", "wrong-password"),
    ]


def kubectl_json(cp: localenv.ControlPlane, *args: str) -> dict[str, Any]:
    result = cp.kubectl_run(*args, "-o", "json", check=True)
    return dict(json.loads(result.stdout))


def settled(obj: dict[str, Any]) -> bool:
    """Whether the operator has looked at this generation and left a condition."""
    status = obj.get("status") or {}
    return bool(status.get("conditions")) and status.get("observedGeneration") == obj["metadata"].get("generation")


def test_fuzzed_specs_end_with_a_named_condition(
    fuzz_env: tuple[localenv.ControlPlane, localenv.Postgres, Path],
) -> None:
    cp, server, workdir = fuzz_env
    started = time.monotonic()
    specs = generate_isolated(SPECS, SEED)
    generated_s = time.monotonic() - started
    digest = hashlib.sha256(json.dumps(specs, sort_keys=True).encode()).hexdigest()[:12]  # same seed, same digest
    dbname = f"fuzz_{uuid.uuid4().hex[:8]}"
    server.execute(f'CREATE DATABASE "{dbname}"')
    with psycopg.connect(server.dsn(dbname), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
        conn.execute(HOSTILE_TABLES)
        seed_tasks(conn, 200)
    namespaces = [f"fuzz-{i}-{uuid.uuid4().hex[:6]}" for i in range(NAMESPACES)]
    docs: list[dict[str, Any]] = []
    for ns in namespaces:
        cp.kubectl_run("create", "namespace", ns, check=True)
        docs += fixtures(ns, server, dbname)
    fuzzed: list[dict[str, Any]] = []
    for i, (kind, spec) in enumerate(specs):
        fuzzed.append(
            {
                "apiVersion": "pgscale.io/v1alpha1",
                "kind": kind,
                "metadata": {"name": f"{kind.lower()}-{i:04d}", "namespace": namespaces[i % NAMESPACES]},
                "spec": spec,
            }
        )
    kubeconfig = localenv.operator_identity(cp, workdir)
    op = localenv.OperatorProcess(workdir, kubeconfig, extra_env={"PGSCALE_STALLED_RETRY_SECONDS": "120"})
    op.start("--all-namespaces")  # (-n per namespace needs the chart's watchNamespaces RBAC)
    try:
        (workdir / "fixtures.yaml").write_text(yaml.safe_dump_all(docs))
        cp.kubectl_run("apply", "--server-side", "-f", str(workdir / "fixtures.yaml"), check=True)
        # JSON, not YAML: the API server's YAML reads a bare `n` or `y` as a boolean.
        (workdir / "fuzzed.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": fuzzed}))
        applied = time.monotonic()
        result = cp.kubectl_run(
            "apply", "--server-side", "--force-conflicts", "-f", str(workdir / "fuzzed.json"), timeout=600
        )
        apply_s = time.monotonic() - applied
        rejections = [line for line in result.stderr.splitlines() if line.strip()]
        fuzzed_names = {(d["kind"], d["metadata"]["namespace"], d["metadata"]["name"]) for d in fuzzed}
        deadline = time.monotonic() + CONDITION_WITHIN
        while True:
            objects = [
                (kind, o)
                for kind, plural in PLURALS.items()
                for o in kubectl_json(cp, "get", plural, "-A")["items"]
                if (kind, o["metadata"]["namespace"], o["metadata"]["name"]) in fuzzed_names
            ]
            pending = [o for _, o in objects if not settled(o)]
            if not pending or time.monotonic() > deadline:
                break
            time.sleep(2)
        settled_s = time.monotonic() - applied
        events = kubectl_json(cp, "get", "events", "-A")["items"]
    finally:
        op.stop()
    log = op.log.read_text(errors="replace")
    reasons: Counter[str] = Counter()
    examples: dict[str, str] = {}
    internal: list[str] = []
    known: Counter[str] = Counter()
    for kind, o in objects:
        conds = {c["type"]: c for c in (o.get("status") or {}).get("conditions") or []}
        ready = conds.get("Ready") or {}
        stalled = (conds.get("Stalled") or {}).get("status") == "True"
        state = "Ready" if ready.get("status") == "True" else "Stalled" if stalled else "Reconciling"
        reasons[f"{state}/{ready.get('reason') or '-'}"] += 1
        examples.setdefault(f"{kind}/{ready.get('reason')}", f"{o['metadata']['name']}: {ready.get('message')}")
        for c in conds.values():
            if c.get("reason") != "InternalError":
                continue
            label = next((k for k, text in KNOWN_ELSEWHERE.items() if text in str(c.get("message"))), None)
            if label:
                known[label] += c["type"] == "Ready"  # once per resource
            else:
                internal.append(f"{kind} {o['metadata']['name']}: {c.get('message')}\n  spec: {json.dumps(o['spec'])}")
    # A Traceback is an InternalError's log line: those of known failures are counted apart.
    blocks = log.split("Traceback (most recent call last):")[1:]
    unknown = [b.split("\n20")[0] for b in blocks]
    unknown = [b for b in unknown if not any(text in b for text in KNOWN_ELSEWHERE.values())]
    tracebacks = len(unknown)
    print(
        f"\nfuzz: seed={SEED} specs={len(specs)} digest={digest} accepted={len(objects)} "
        f"rejected={len(specs) - len(objects)} "
        f"without-condition={len(pending)} internal-errors={len(internal)} tracebacks={tracebacks} "
        f"known-elsewhere={sum(known.values())} "
        f"generate={generated_s:.1f}s apply={apply_s:.1f}s settled={settled_s:.1f}s"
    )
    print("fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in reasons.most_common()))
    print("fuzz known elsewhere: " + (", ".join(f"{k}={v}" for k, v in known.items()) or "none"))
    print("fuzz examples:\n  " + "\n  ".join(f"{k}: {v[:300]}" for k, v in sorted(examples.items())))
    print("fuzz rejections (first 5): " + "\n  ".join(rejections[:5]))
    # Secrets stay in Secrets: the passwords of the Secrets and of a fuzzed endpoint URL appear nowhere.
    surfaces = {
        "conditions": json.dumps([o.get("status") for _, o in objects]),
        "events": json.dumps([e.get("message") for e in events]),
        "operator log": log,
    }
    for secret in (server.PASSWORD, "not-the-password", "fuzz-secret", "pa55word"):
        leaks = [where for where, text in surfaces.items() if secret in text]
        assert not leaks, f"{secret!r} leaked into {leaks}"
    assert len(specs) >= 500
    assert len(objects) >= 500, f"the API server accepted only {len(objects)} specs: {rejections[:10]}"
    assert not internal, "InternalError:\n" + "\n".join(internal[:20])
    assert not unknown, "Traceback in the operator log:\n" + "\n".join(unknown[:3])
    assert not pending, "no condition after 60 s: " + ", ".join(o["metadata"]["name"] for o in pending[:20])
