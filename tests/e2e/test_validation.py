"""The real kube-apiserver rejects invalid specs, with a message naming the field.

Each row: a valid object of a kind, one change that breaks it, and text the
API server's error must contain. Immutable-field rows first create the valid
object, then try the change as an update.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

pytestmark = pytest.mark.cluster

VALID: dict[str, dict[str, Any]] = {
    "DatabaseProfile": {"connection": {"secretRef": {"name": "app-db"}}, "tier": "production"},
    "PartitionPolicy": {
        "profileRef": {"name": "app"},
        "table": {"name": "Task"},
        "column": "createdAt",
        "interval": "monthly",
    },
    "RetentionPolicy": {
        "profileRef": {"name": "app"},
        "table": {"name": "Task"},
        "ageColumn": "completedAt",
        "olderThan": "90d",
    },
    "FileMigration": {
        "profileRef": {"name": "app"},
        "table": {"name": "File"},
        "keyColumn": "id",
        "dataColumn": "data",
        "encoding": "base64",
        "destination": {"s3": {"bucket": "app-files", "endpoint": "http://minio:9000"}},
    },
    "Cache": {"profileRef": {"name": "app"}, "invalidate": [{"table": {"name": "Task"}, "keys": ["task:{id}"]}]},
}


def _set(spec: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    for key in keys[:-1]:
        spec = spec.setdefault(key, {})
    if value is DELETE:
        del spec[keys[-1]]
    else:
        spec[keys[-1]] = value


DELETE = object()

# (id, kind, path in spec, new value, text the error must contain)
CASES: list[tuple[str, str, str, Any, str]] = [
    ("profile-missing-connection", "DatabaseProfile", "connection", DELETE, "spec.connection: Required value"),
    ("profile-secret-without-name", "DatabaseProfile", "connection.secretRef", {}, "spec.connection.secretRef.name"),
    ("profile-unknown-tier", "DatabaseProfile", "tier", "huge", "spec.tier: Unsupported value"),
    ("profile-tier-and-resources", "DatabaseProfile", "resources", {"cpu": 4, "memory": "16Gi"},
     "set either tier or resources"),
    ("profile-negative-cpu", "DatabaseProfile", "resources", {"cpu": -1, "memory": "1Gi"}, "spec.resources.cpu"),
    ("profile-bad-memory", "DatabaseProfile", "resources", {"cpu": 2, "memory": "lots"}, "spec.resources.memory"),
    ("profile-forbidden-data-directory", "DatabaseProfile", "parameters", {"data_directory": "/x"},
     "parameters.data_directory would break the server"),
    ("profile-forbidden-listen-addresses", "DatabaseProfile", "parameters",
     {"work_mem": "4MB", "listen_addresses": "*"},
     "parameters.listen_addresses would break"),
    ("profile-parameter-name-case", "DatabaseProfile", "parameters", {"Work-Mem": "4MB"},
     "names are lower-case Postgres setting names"),
    ("profile-parameter-not-string", "DatabaseProfile", "parameters", {"max_connections": 200},
     "spec.parameters.max_connections"),
    ("profile-bad-pool-mode", "DatabaseProfile", "pooling", {"poolMode": "fast"}, "spec.pooling.poolMode"),
    ("profile-pgbouncer-key-not-allowed", "DatabaseProfile", "pooling", {"parameters": {"listen_port": "1"}},
     "spec.pooling.parameters"),
    ("profile-negative-replicas", "DatabaseProfile", "readReplicas",
     {"instances": -1, "replicationSecretRef": {"name": "r"}, "storage": {"size": "1Gi"}},
     "spec.readReplicas.instances"),
    ("profile-port-out-of-range", "DatabaseProfile", "connection.port", 70000, "spec.connection.port"),
    ("profile-unknown-field", "DatabaseProfile", "tierr", "production", 'unknown field "spec.tierr"'),
    ("partition-hourly-interval", "PartitionPolicy", "interval", "hourly", "spec.interval: Unsupported value"),
    ("partition-maintenance-interval-overflow", "PartitionPolicy", "maintenance", {"interval": "999999999w"},
     "spec.maintenance.interval"),
    ("partition-schedule-never-fires", "PartitionPolicy", "maintenance", {"cronJob": True, "schedule": "0 0 31 4 *"},
     "schedule never fires"),
    ("partition-schedule-february-30", "PartitionPolicy", "maintenance", {"schedule": "15 3 30 FEB ?"},
     "schedule never fires"),
    ("profile-monitoring-interval-overflow", "DatabaseProfile", "monitoring", {"interval": "100w"},
     "spec.monitoring.interval"),
    ("partition-table-with-quote", "PartitionPolicy", "table.name", 'Task"', "spec.table.name"),
    ("partition-table-with-semicolon", "PartitionPolicy", "table.name", "Task;DROP TABLE x", "spec.table.name"),
    ("partition-column-with-nul", "PartitionPolicy", "column", "created\u0000At", "spec.column"),
    ("partition-schema-too-long", "PartitionPolicy", "table.schema", "s" * 64, "spec.table.schema"),
    ("partition-zero-premake", "PartitionPolicy", "premake", 0, "spec.premake"),
    ("partition-naming-without-month", "PartitionPolicy", "namingPattern", "{table}_{YYYY}",
     "monthly partitions need {MM}"),
    ("partition-malformed-keep", "PartitionPolicy", "retention", {"keep": "12 parsecs"}, "spec.retention.keep"),
    ("partition-malformed-lock-timeout", "PartitionPolicy", "conversion", {"lockTimeout": "1 second"},
     "spec.conversion.lockTimeout"),
    ("partition-missing-profile", "PartitionPolicy", "profileRef", DELETE, "spec.profileRef: Required value"),
    ("retention-cron-words", "RetentionPolicy", "schedule", "every day", "spec.schedule"),
    ("retention-cron-three-fields", "RetentionPolicy", "schedule", "* * *", "spec.schedule"),
    ("retention-negative-age", "RetentionPolicy", "olderThan", "-90d", "spec.olderThan"),
    ("retention-unknown-operator", "RetentionPolicy", "filters", [{"column": "status", "operator": "Like",
                                                                    "values": ["x"]}], "spec.filters[0].operator"),
    ("retention-in-without-values", "RetentionPolicy", "filters", [{"column": "status", "operator": "In"}],
     "filters[].values: required"),
    ("retention-filter-column-injection", "RetentionPolicy", "filters",
     [{"column": "status; DROP TABLE x", "operator": "IsNull"}], "spec.filters[0].column"),
    ("retention-delete-with-archive", "RetentionPolicy", "action", "delete", "archive: only allowed"),
    ("retention-zero-batch", "RetentionPolicy", "batchSize", 0, "spec.batchSize"),
    ("retention-max-batch-below-batch", "RetentionPolicy", "maxBatchSize", 10, "maxBatchSize: must be at least"),
    ("retention-children-unknown-mode", "RetentionPolicy", "children", {"mode": "purge"}, "spec.children.mode"),
    ("retention-children-table-without-mode", "RetentionPolicy", "children", {"tables": [{"name": "Message"}]},
     "spec.children.tables[0].mode"),
    ("retention-schedule-never-fires", "RetentionPolicy", "schedule", "0 0 31 4 *", "schedule never fires"),
    ("files-two-destinations", "FileMigration", "destination.filesystem", {"claimName": "files"},
     "set exactly one of s3 or filesystem"),
    ("files-no-destination", "FileMigration", "destination", {}, "set exactly one of s3 or filesystem"),
    ("files-unknown-encoding", "FileMigration", "encoding", "hex", "spec.encoding: Unsupported value"),
    ("files-key-template-without-key", "FileMigration", "keyTemplate", "{table}/file", "must contain {key}"),
    ("files-bad-bucket", "FileMigration", "destination.s3.bucket", "Upper_Case", "spec.destination.s3.bucket"),
    ("files-zero-concurrency", "FileMigration", "concurrency", 0, "spec.concurrency"),
    ("files-path-traversal", "FileMigration", "destination", {"filesystem": {"claimName": "f", "path": "a/../b/"}},
     "must not contain .."),
    ("files-key-is-data", "FileMigration", "dataColumn", "id", "keyColumn and dataColumn must differ"),
    ("files-unknown-phase", "FileMigration", "phase", "delete", "spec.phase: Unsupported value"),
    ("cache-unclosed-placeholder", "Cache", "invalidate", [{"table": {"name": "Task"}, "keys": ["task:{id"]}],
     "spec.invalidate[0].keys[0]"),
    ("cache-sql-in-placeholder", "Cache", "invalidate",
     [{"table": {"name": "Task"}, "keys": ["task:{id);DROP TABLE x;--}"]}], "spec.invalidate[0].keys[0]"),
    ("cache-no-keys-no-tag", "Cache", "invalidate", [{"table": {"name": "Task"}}], "set keys, tag, or both"),
    ("cache-table-twice", "Cache", "invalidate",
     [{"table": {"name": "Task"}, "keys": ["a:{id}"]}, {"table": {"name": "Task"}, "tag": "t"}],
     "each table at most once"),
    ("cache-unknown-policy", "Cache", "maxmemoryPolicy", "lru", "spec.maxmemoryPolicy: Unsupported value"),
    ("cache-no-headroom", "Cache", "maxmemoryPercent", 100, "spec.maxmemoryPercent"),
]  # fmt: skip

# (id, kind, path, new value, text): the change is refused on update only.
IMMUTABLE: list[tuple[str, str, str, Any, str]] = [
    ("profile-state-schema", "DatabaseProfile", "stateSchema", "other", "stateSchema is immutable"),
    ("partition-table", "PartitionPolicy", "table.name", "Message", "table is immutable"),
    ("partition-interval", "PartitionPolicy", "interval", "daily", "interval is immutable"),
    ("retention-table", "RetentionPolicy", "table.name", "Message", "table is immutable"),
    ("files-destination", "FileMigration", "destination.s3.bucket", "other-bucket", "destination is immutable"),
    ("files-data-column", "FileMigration", "dataColumn", "blob", "dataColumn is immutable"),
]


def _object(kind: str, name: str, spec: dict[str, Any]) -> str:
    return json.dumps({"apiVersion": "pgscale.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec})


def test_table_has_at_least_25_cases() -> None:
    assert len(CASES) + len(IMMUTABLE) >= 25


@pytest.mark.parametrize(("case", "kind", "path", "value", "expected"), CASES, ids=[c[0] for c in CASES])
def test_invalid_spec_is_rejected(kubectl: Any, case: str, kind: str, path: str, value: Any, expected: str) -> None:
    spec = copy.deepcopy(VALID[kind])
    if kind == "RetentionPolicy" and path == "action":
        spec["archive"] = {"table": "Task_archive"}
    _set(spec, path, value)
    result = kubectl.apply(_object(kind, case, spec), "--dry-run=server", check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize(("case", "kind", "path", "value", "expected"), IMMUTABLE, ids=[c[0] for c in IMMUTABLE])
def test_immutable_field_change_is_rejected(
    kubectl: Any, case: str, kind: str, path: str, value: Any, expected: str
) -> None:
    spec = copy.deepcopy(VALID[kind])
    kubectl.apply(_object(kind, case, spec))
    _set(spec, path, value)
    result = kubectl.apply(_object(kind, case, spec), check=False)
    assert result.returncode != 0, f"{case} was accepted"
    assert expected in result.stderr, result.stderr


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_spec_is_accepted_with_defaults(kubectl: Any, kind: str) -> None:
    kubectl.apply(_object(kind, "valid", copy.deepcopy(VALID[kind])))
    stored = kubectl.get(kind.lower(), "valid")
    assert stored["metadata"]["generation"] == 1
    if kind == "RetentionPolicy":
        assert stored["spec"]["schedule"] == "0 2 1 * *" and stored["spec"]["batchSize"] == 1000
    if kind == "FileMigration":
        assert stored["spec"]["pathColumn"] == "filePath" and stored["spec"]["phase"] == "copy"
