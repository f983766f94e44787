"""Every object pgscale builds is accepted by the real kube-apiserver (server-side dry run)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import Kubectl
from pgscale.api.databaseprofile import DatabaseProfileSpec, PoolingSpec, ReadReplicasSpec
from pgscale.kube import ObjectRef
from pgscale.specs import builders, pooling, replicas

pytestmark = pytest.mark.cluster


def objects(namespace: str) -> list[dict[str, Any]]:
    owner = ObjectRef(
        "pgscale.io/v1alpha1", "DatabaseProfile", namespace, "app", "0c8e0f0e-0000-4000-8000-000000000001"
    )
    rr = ReadReplicasSpec.model_validate(
        {
            "instances": 2,
            "replicationSecretRef": {"name": "repl"},
            "storage": {"size": "10Gi"},
            "resources": {"limits": {"memory": "1Gi"}},
        }
    )
    pool = PoolingSpec.model_validate({"instances": 2, "resources": {"requests": {"cpu": "100m"}}})
    profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "db"}}})
    ini = pooling.pgbouncer_ini(pool, backend_host="db", backend_port=5432, dbname="app", auth_file="/etc/pgbouncer/u")
    out = [
        replicas.config_map(owner),
        replicas.statefulset(owner, rr, image="postgres:15", primary_host="db", primary_port=5432),
        replicas.read_only_service(owner),
        *replicas.read_write_service(owner, "10.20.30.40", 5432),
        pooling.config_secret(owner, "app-pooler-rw-config", ini, pooling.userlist("u", "p")),
        pooling.deployment(owner, "app-pooler-rw", pool, "pgbouncer:1", "app-pooler-rw-config", "abc", "rw"),
        pooling.service(owner, "app-pooler-rw", "rw"),
        builders.cron_job(
            owner,
            suffix="retention",
            schedule="0 2 1 * *",
            time_zone="Europe/Berlin",
            suspend=False,
            args=["job", "retention"],
            template=None,
            default_image="pgscale:1",
            env=builders.job_env(owner, {"a": 1}, profile),
        ),
        builders.job(
            owner,
            name="app-files-1-0",
            suffix="file-migration",
            args=["job", "file-migration"],
            template=None,
            default_image="pgscale:1",
            env=[builders.secret_env("AWS_ACCESS_KEY_ID", "s3", "id")],
            volumes=[
                (
                    {"name": "files", "persistentVolumeClaim": {"claimName": "files"}},
                    {"name": "files", "mountPath": "/data"},
                )
            ],
        ),
    ]
    return out


def test_every_built_object_is_valid(kubectl: Kubectl) -> None:
    items = objects(kubectl.namespace)
    result = kubectl.apply(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": items}),
        "--dry-run=server",
        "--server-side",
        check=False,
    )
    assert result.returncode == 0, result.stderr
    kinds = {i["kind"] for i in items}
    assert {"StatefulSet", "EndpointSlice", "Deployment", "CronJob", "Job", "Secret", "ConfigMap", "Service"} <= kinds
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", kubectl.namespace, "app", "0c8e0f0e-0000-4000-8000-1")
    external = replicas.read_write_service(owner, "db.example", 5432)
    ok = kubectl.apply(json.dumps(external[0]), "--dry-run=server", check=False)
    assert ok.returncode == 0, ok.stderr


def test_apply_sends_characters_outside_the_bmp(control_plane: Any, namespace: str) -> None:
    """Regression (fuzz, seed 3): a spec value with an emoji, copied into an object pgscale applies (a Job's
    image, a label), made the API server answer 400 `found invalid Unicode character escape code` (JSON's
    surrogate-pair escape is not YAML) and the resource retried forever. Server-side apply sends UTF-8."""
    from kubernetes.config import new_client_from_config

    from pgscale.kube import Kube

    kube = Kube(new_client_from_config(config_file=str(control_plane.kubeconfig)))  # type: ignore[no-untyped-call]
    value = 'emoji \U0001f600, CJK \u4e2d, escape \x1b, quote " and backslash \\'
    meta = {"name": "unicode", "namespace": namespace}
    stored = kube.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"value": value}})
    assert stored["data"]["value"] == value
