"""Read replicas of a DatabaseProfile: slot names and the objects that run them.

Each replica pod runs scripts/replica-bootstrap.sh from a ConfigMap: clone the
primary through its own physical slot, then stream as a hot standby. `<name>-ro`
selects the replicas; `<name>-rw` points at the primary, wherever it lives.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from importlib import resources
from typing import Any

from ..api.databaseprofile import ReadReplicasSpec
from ..kube import ObjectRef
from .builders import labels, object_meta

COMPONENT = "read-replica"
PORT = 5432
DATA = "/var/lib/postgresql/data"
SOCKET_DIR = "/var/run/postgresql"
# The clone carries the primary's postgresql.conf when it lives in the data directory (initdb's
# layout, CloudNativePG's): its listen_addresses, port and socket directory are the primary's
# machine's, and a replica pod that kept them could not start (found by the node tests).
SERVER_ARGS = f"-c listen_addresses=0.0.0.0 -c port={PORT} -c unix_socket_directories={SOCKET_DIR}"


def bootstrap_script() -> str:
    return resources.files("pgscale").joinpath("scripts/replica-bootstrap.sh").read_text()


def slot_prefix(owner: ObjectRef) -> str:
    """pgscale_<namespace>_<profile>_<hash>_: readable, and unique per profile.

    Sanitising names alone would let two profiles share a prefix (a-b/c and a/b-c);
    the hash of namespace/name keeps every profile's slots its own.
    """
    digest = hashlib.sha256(f"{owner.namespace}/{owner.name}".encode()).hexdigest()[:8]
    base = re.sub(r"[^a-z0-9_]", "_", f"pgscale_{owner.namespace}_{owner.name}".lower())[:44]
    return f"{base}_{digest}_"


def slot_names(owner: ObjectRef, instances: int) -> list[str]:
    return [f"{slot_prefix(owner)}{i}" for i in range(instances)]


def statefulset_name(owner: ObjectRef) -> str:
    return f"{owner.name}-replica"


def config_map(owner: ObjectRef) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(owner, f"{statefulset_name(owner)}-bootstrap", COMPONENT),
        "data": {"bootstrap.sh": bootstrap_script()},
    }


def statefulset(
    owner: ObjectRef, spec: ReadReplicasSpec, *, image: str, primary_host: str, primary_port: int
) -> dict[str, Any]:
    """Hot standbys, one PVC each, started by the bootstrap script."""
    name = statefulset_name(owner)
    pod_labels = {**labels(owner, COMPONENT), "pgscale.io/role": "replica"}
    secret = spec.replication_secret_ref.name
    env = [
        {"name": "PGDATA", "value": f"{DATA}/pgdata"},
        {"name": "PRIMARY_HOST", "value": primary_host},
        {"name": "PRIMARY_PORT", "value": str(primary_port)},
        {"name": "SLOT_PREFIX", "value": slot_prefix(owner)},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POSTGRES_ARGS", "value": SERVER_ARGS},
        {"name": "REPLICATION_USER", "valueFrom": {"secretKeyRef": {"name": secret, "key": "username"}}},
        {"name": "REPLICATION_PASSWORD", "valueFrom": {"secretKeyRef": {"name": secret, "key": "password"}}},
    ]
    container: dict[str, Any] = {
        "name": "postgres",
        "image": spec.image or image,
        "command": ["sh", "/pgscale/bootstrap.sh"],
        "env": env,
        "ports": [{"name": "postgres", "containerPort": PORT}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-q", "-h", "127.0.0.1"]}, "periodSeconds": 5},
        "livenessProbe": {"tcpSocket": {"port": PORT}, "initialDelaySeconds": 30, "periodSeconds": 10},
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "data", "mountPath": DATA},
            {"name": "bootstrap", "mountPath": "/pgscale"},
            {"name": "run", "mountPath": SOCKET_DIR},
        ],
    }
    if spec.resources:
        container["resources"] = spec.resources.wire()
    claim: dict[str, Any] = {
        "metadata": {"name": "data", "labels": pod_labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": spec.storage.size}}},
    }
    if spec.storage.storage_class_name:
        claim["spec"]["storageClassName"] = spec.storage.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": object_meta(owner, name, COMPONENT),
        "spec": {
            "serviceName": f"{owner.name}-ro",
            "replicas": spec.instances,
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": pod_labels},
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": {
                    "securityContext": {
                        "runAsUser": 999,
                        "runAsGroup": 999,
                        "fsGroup": 999,
                        "runAsNonRoot": True,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [container],
                    "volumes": [
                        {"name": "bootstrap", "configMap": {"name": f"{name}-bootstrap"}},
                        {"name": "run", "emptyDir": {}},
                    ],
                },
            },
            "volumeClaimTemplates": [claim],
        },
    }


def read_only_service(owner: ObjectRef) -> dict[str, Any]:
    """`<name>-ro`: the replicas, for analytics and reporting."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(owner, f"{owner.name}-ro", COMPONENT),
        "spec": {
            "selector": {**labels(owner, COMPONENT), "pgscale.io/role": "replica"},
            "ports": [{"name": "postgres", "port": PORT, "targetPort": PORT}],
        },
    }


def unreachable_from_pods(host: str) -> bool:
    """Loopback and link-local addresses mean nothing inside a pod (Kubernetes refuses them as endpoints)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host == "localhost"
    return ip.is_loopback or ip.is_link_local


def read_write_service(owner: ObjectRef, host: str, port: int) -> list[dict[str, Any]]:
    """`<name>-rw`: the primary. A DNS name becomes an ExternalName; an IP a selector-less Service
    with an EndpointSlice. Empty for an address pods cannot reach (loopback)."""
    if unreachable_from_pods(host):
        return []
    meta = object_meta(owner, f"{owner.name}-rw", "primary")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": meta,
                "spec": {"type": "ExternalName", "externalName": host},
            }
        ]
    ports = [{"name": "postgres", "port": PORT, "targetPort": port, "protocol": "TCP"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": ports}}
    slice_meta = object_meta(owner, f"{owner.name}-rw", "primary")
    slice_meta["labels"] = {
        **slice_meta["labels"],
        "kubernetes.io/service-name": f"{owner.name}-rw",
        "endpointslice.kubernetes.io/managed-by": "pgscale.io",
    }
    endpoints = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": slice_meta,
        "addressType": "IPv6" if ip.version == 6 else "IPv4",
        "endpoints": [{"addresses": [str(ip)], "conditions": {"ready": True}}],
        "ports": [{"name": "postgres", "port": port, "protocol": "TCP"}],
    }
    return [service, endpoints]
