"""CloudNativePG objects for the `cloudnativepg` settings method: the part of a `Cluster` pgscale
applies, its `Pooler` resources, and reading server-side apply's answers (conflicts, managedFields).

The `Cluster` belongs to someone else (GitOps, a person): pgscale applies only the fields it
owns (`spec.postgresql.parameters.<name>`, `spec.instances` when read replicas are asked for)
with server-side apply under a field manager of its own per profile, never forcing. The lists
of parameters CloudNativePG refuses and of PgBouncer parameters it allows are copied from
the module pinned in hack/cnpg/go.mod (tests/e2e/test_cloudnativepg_e2e.py checks them against
its source).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from ..api.databaseprofile import DatabaseProfileSpec, PoolingSpec
from ..kube import ObjectRef
from .builders import object_meta

API_VERSION = "postgresql.cnpg.io/v1"
# The label CloudNativePG puts on the Secrets it generates for a Cluster (app, superuser).
CLUSTER_LABEL = "cnpg.io/cluster"
POOLER_COMPONENT = "cnpg-pooler"
PARAMETERS_PATH = "spec.postgresql.parameters"
INSTANCES_PATH = "spec.instances"

# CloudNativePG's FixedConfigurationParameters (pkg/postgres/configuration.go): its webhook
# refuses a Cluster that sets any of them ("fixed": the operator sets the value; "blocked":
# must keep Postgres's default). pgscale reports them and sends none.
FIXED_PARAMETERS: tuple[str, ...] = (
    "allow_system_table_mods",
    "archive_cleanup_command",
    "archive_command",
    "archive_mode",
    "bonjour",
    "bonjour_name",
    "cluster_name",
    "config_file",
    "data_directory",
    "data_sync_retry",
    "event_source",
    "external_pid_file",
    "hba_file",
    "hot_standby",
    "ident_file",
    "jit_provider",
    "listen_addresses",
    "log_destination",
    "log_directory",
    "log_file_mode",
    "log_filename",
    "log_rotation_age",
    "log_rotation_size",
    "log_truncate_on_rotation",
    "logging_collector",
    "pg_failover_slots.primary_dsn",
    "pg_failover_slots.standby_slot_names",
    "port",
    "primary_conninfo",
    "primary_slot_name",
    "promote_trigger_file",
    "recovery_end_command",
    "recovery_min_apply_delay",
    "recovery_target",
    "recovery_target_action",
    "recovery_target_inclusive",
    "recovery_target_lsn",
    "recovery_target_name",
    "recovery_target_time",
    "recovery_target_timeline",
    "recovery_target_xid",
    "restart_after_crash",
    "restore_command",
    "shared_preload_libraries",
    "ssl",
    "ssl_ca_file",
    "ssl_cert_file",
    "ssl_crl_file",
    "ssl_dh_params_file",
    "ssl_ecdh_curve",
    "ssl_key_file",
    "ssl_passphrase_command",
    "ssl_passphrase_command_supports_reload",
    "ssl_prefer_server_ciphers",
    "stats_temp_directory",
    "synchronized_standby_slots",
    "synchronous_standby_names",
    "syslog_facility",
    "syslog_ident",
    "syslog_sequence_numbers",
    "syslog_split_messages",
    "temp_tablespaces",
    "unix_socket_directories",
    "unix_socket_group",
    "unix_socket_permissions",
)

# Where CloudNativePG wants a refused setting instead, when it has a place for it.
FIXED_HINTS: Mapping[str, str] = {
    "shared_preload_libraries": "the Cluster's spec.postgresql.shared_preload_libraries",
    "synchronous_standby_names": "the Cluster's spec.postgresql.synchronous",
    "temp_tablespaces": "the Cluster's spec.tablespaces (temporary: true)",
}

# CloudNativePG's AllowedPgbouncerGenericConfigurationParameters (internal/webhook/v1/pooler_webhook.go).
PGBOUNCER_PARAMETERS: tuple[str, ...] = (
    "application_name_add_host",
    "auth_type",
    "autodb_idle_timeout",
    "cancel_wait_timeout",
    "client_idle_timeout",
    "client_login_timeout",
    "client_tls_sslmode",
    "default_pool_size",
    "disable_pqexec",
    "dns_max_ttl",
    "dns_nxdomain_ttl",
    "idle_transaction_timeout",
    "ignore_startup_parameters",
    "listen_backlog",
    "log_connections",
    "log_disconnections",
    "log_pooler_errors",
    "log_stats",
    "max_client_conn",
    "max_db_connections",
    "max_packet_size",
    "max_prepared_statements",
    "max_user_connections",
    "min_pool_size",
    "pkt_buf",
    "query_timeout",
    "query_wait_timeout",
    "reserve_pool_size",
    "reserve_pool_timeout",
    "sbuf_loopcnt",
    "server_check_delay",
    "server_check_query",
    "server_connect_timeout",
    "server_fast_close",
    "server_idle_timeout",
    "server_lifetime",
    "server_login_retry",
    "server_reset_query",
    "server_reset_query_always",
    "server_round_robin",
    "server_tls_ciphers",
    "server_tls_protocols",
    "server_tls_sslmode",
    "stats_period",
    "suspend_timeout",
    "tcp_defer_accept",
    "tcp_keepalive",
    "tcp_keepcnt",
    "tcp_keepidle",
    "tcp_keepintvl",
    "tcp_socket_buffer",
    "tcp_user_timeout",
    "track_extra_parameters",
    "verbose",
)

Role = Literal["rw", "ro"]
MANAGER_PREFIX = "pgscale/"
_MANAGER_MAX = 128  # the API server's limit on a field manager's name


def field_manager(profile: str) -> str:
    """The field manager of one profile's fields in a Cluster: `pgscale/<profile>`.

    One per profile, so two profiles never take each other's fields (an apply of the same
    manager replaces its whole set), and deleting one releases exactly what it applied.
    """
    name = MANAGER_PREFIX + profile
    if len(name) <= _MANAGER_MAX:
        return name
    digest = hashlib.sha256(profile.encode()).hexdigest()[:16]
    return f"{MANAGER_PREFIX}{profile[: _MANAGER_MAX - len(MANAGER_PREFIX) - 17]}-{digest}"


def cluster_name(spec: DatabaseProfileSpec, secret_labels: Mapping[str, str] | None) -> tuple[str | None, str]:
    """The Cluster a profile names (spec.settings.clusterRef, else the Secret's cnpg.io/cluster label),
    and where that name came from, for status and messages."""
    ref = spec.settings_or_default.cluster_ref
    if ref is not None:
        return ref.name, "spec.settings.clusterRef"
    label = (secret_labels or {}).get(CLUSTER_LABEL)
    if label:
        return label, f"the connection Secret's {CLUSTER_LABEL} label"
    return None, ""


def instances(spec: DatabaseProfileSpec) -> int | None:
    """spec.instances for the Cluster: the primary plus the read replicas; None leaves it to others."""
    if spec.read_replicas is None:
        return None
    return 1 + spec.read_replicas.instances


def split_parameters(desired: Mapping[str, tuple[str, str]]) -> tuple[dict[str, str], list[str]]:
    """(what goes into the Cluster, the names CloudNativePG refuses and pgscale reports instead)."""
    send = {name: value for name, (value, _) in desired.items() if name not in FIXED_PARAMETERS}
    return send, sorted(set(desired) - set(send))


def cluster_apply(namespace: str, cluster: str, parameters: Mapping[str, str], count: int | None) -> dict[str, Any]:
    """The apply configuration of a Cluster holding only pgscale's fields.

    Server-side apply gives the manager exactly these fields: a parameter it sent before and
    not now is removed (unless another manager holds it too), and an empty configuration
    releases everything.
    """
    spec: dict[str, Any] = {}
    if parameters:
        spec["postgresql"] = {"parameters": dict(sorted(parameters.items()))}
    if count is not None:
        spec["instances"] = count
    obj: dict[str, Any] = {
        "apiVersion": API_VERSION,
        "kind": "Cluster",
        "metadata": {"name": cluster, "namespace": namespace},
    }
    if spec:
        obj["spec"] = spec
    return obj


def pgbouncer_parameters(pooling: PoolingSpec) -> tuple[dict[str, str], list[str]]:
    """PgBouncer settings for a Pooler from the pooling spec, and the keys CloudNativePG would refuse."""
    params = {
        "default_pool_size": str(pooling.default_pool_size),
        "min_pool_size": str(pooling.min_pool_size),
        "reserve_pool_size": str(pooling.reserve_pool_size),
        "max_client_conn": str(pooling.max_client_connections),
        "max_db_connections": str(pooling.max_db_connections),
    }
    dropped = sorted(k for k in pooling.parameters if k not in PGBOUNCER_PARAMETERS)
    params.update({k: v for k, v in pooling.parameters.items() if k in PGBOUNCER_PARAMETERS})
    return dict(sorted(params.items())), dropped


def pooler(owner: ObjectRef, name: str, cluster: str, role: Role, pooling: PoolingSpec) -> dict[str, Any]:
    """A CloudNativePG Pooler in front of the Cluster's primary (rw) or replicas (ro), owned by the profile.

    CloudNativePG runs it (Deployment, Service `<name>`, authentication through its auth_query);
    an image or resources from the spec go into its `pgbouncer` container, nothing else of the
    pod is set, so CloudNativePG's defaults apply.
    """
    params, _ = pgbouncer_parameters(pooling)
    meta = object_meta(owner, name, POOLER_COMPONENT)
    meta["labels"][CLUSTER_LABEL] = cluster
    spec: dict[str, Any] = {
        "cluster": {"name": cluster},
        "instances": pooling.instances,
        "type": role,
        "pgbouncer": {"poolMode": pooling.pool_mode, "parameters": params},
    }
    if pooling.image or pooling.resources:
        container: dict[str, Any] = {"name": "pgbouncer"}
        if pooling.image:
            container["image"] = pooling.image
        if pooling.resources:
            container["resources"] = pooling.resources.wire()
        spec["template"] = {"metadata": {}, "spec": {"containers": [container]}}
    return {"apiVersion": API_VERSION, "kind": "Pooler", "metadata": meta, "spec": spec}


def spec_hash(*objects: Mapping[str, Any]) -> str:
    """A short hash of the Poolers' specs, for status.pooler.configHash."""
    text = json.dumps([o.get("spec") for o in objects], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def owned_by(obj: Mapping[str, Any], owner: ObjectRef) -> bool:
    """Whether an object carries the owner's owner reference (pgscale made it for this profile)."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid for r in refs)


@dataclass(frozen=True)
class Conflict:
    """A field another manager holds with another value: server-side apply's 409."""

    manager: str
    field: str  # as the API server writes it: .spec.postgresql.parameters.work_mem

    @property
    def path(self) -> str:
        return self.field.lstrip(".")

    @property
    def parameter(self) -> str | None:
        """The Postgres setting the field is, when it is one (names may contain dots)."""
        prefix = PARAMETERS_PATH + "."
        return self.path[len(prefix) :] if self.path.startswith(prefix) else None


def conflicts(body: Mapping[str, Any]) -> list[Conflict]:
    """The conflicts of a 409 Status body, from details.causes ("conflict with \"argocd\" using ...")."""
    out = []
    for cause in (body.get("details") or {}).get("causes") or []:
        message = str(cause.get("message") or "")
        manager = message.split('"')[1] if message.count('"') >= 2 else message
        out.append(Conflict(manager=manager, field=str(cause.get("field") or "")))
    return out


def value_at(obj: Mapping[str, Any], path: str) -> Any:
    """The value of a Cluster field by its path (parameters by name, whatever it contains)."""
    prefix = PARAMETERS_PATH + "."
    if path.startswith(prefix):
        return ((obj.get("spec") or {}).get("postgresql") or {}).get("parameters", {}).get(path[len(prefix) :])
    node: Any = obj
    for part in path.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _fields_of(obj: Mapping[str, Any], manager: str) -> dict[str, Any]:
    """The fieldsV1 set a manager holds by apply (merged over its entries)."""
    out: dict[str, Any] = {}
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        if entry.get("manager") == manager and entry.get("operation") == "Apply":
            _merge(out, entry.get("fieldsV1") or {})
    return out


def _merge(into: dict[str, Any], other: Mapping[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, Mapping):
            _merge(into.setdefault(key, {}), value)


def owned_parameters(obj: Mapping[str, Any], manager: str) -> set[str]:
    """The Cluster parameters a manager holds, from metadata.managedFields."""
    fields = _fields_of(obj, manager)
    params = fields.get("f:spec", {}).get("f:postgresql", {}).get("f:parameters", {})
    return {key[2:] for key in params if key.startswith("f:")}


def owns_instances(obj: Mapping[str, Any], manager: str) -> bool:
    """Whether a manager holds the Cluster's spec.instances."""
    return "f:instances" in _fields_of(obj, manager).get("f:spec", {})


def managers_of(obj: Mapping[str, Any], path: str) -> list[str]:
    """Every manager holding a Cluster field (`spec.instances`, `spec.postgresql.parameters.<name>`)."""
    prefix = PARAMETERS_PATH + "."
    if path.startswith(prefix):
        keys = ["f:spec", "f:postgresql", "f:parameters", "f:" + path[len(prefix) :]]
    else:
        keys = ["f:" + p for p in path.split(".")]
    out = []
    for entry in (obj.get("metadata") or {}).get("managedFields") or []:
        node: Any = entry.get("fieldsV1") or {}
        for key in keys:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None and entry.get("manager") not in out:
            out.append(str(entry.get("manager")))
    return out


def empties_a_map(body: Mapping[str, Any]) -> bool:
    """A 422 of server-side apply emptying a map another manager holds: the API server writes the empty
    map as null and its schema refuses that (kubernetes/kubernetes#117447; structured-merge-diff fixed it
    later). Happens when the last parameters pgscale gives back leave `{}` someone else applied."""
    return body.get("code") == 422 and 'must be of type object: "null"' in str(body.get("message") or "")


def _pointer(part: str) -> str:
    return part.replace("~", "~0").replace("/", "~1")


def removal_ops(live: Mapping[str, Any], manager: str, keep: set[str], keep_instances: bool) -> list[dict[str, Any]]:
    """A JSON patch removing the fields only `manager` holds and no longer sends, guarded by the
    resourceVersion it was computed from: what the empty-map case above needs instead of an apply."""
    ops: list[dict[str, Any]] = []
    prefix = PARAMETERS_PATH + "."
    for name in sorted(owned_parameters(live, manager) - keep):
        if managers_of(live, prefix + name) == [manager]:
            ops.append({"op": "remove", "path": f"/spec/postgresql/parameters/{_pointer(name)}"})
    if not keep_instances and owns_instances(live, manager) and managers_of(live, INSTANCES_PATH) == [manager]:
        ops.append({"op": "remove", "path": "/spec/instances"})
    if not ops:
        return []
    version = (live.get("metadata") or {}).get("resourceVersion")
    return [{"op": "test", "path": "/metadata/resourceVersion", "value": version}, *ops]
