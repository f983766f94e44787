"""PgBouncer pooler building blocks: pgbouncer.ini, userlist.txt and the objects that run them.

The functions take the parsed PoolingSpec and plain values. PgBouncer's config parser is simple (one
`key = value` per line, keys limited to ``[A-Za-z0-9_.*-]``, no escaping), so every
value that reaches the file is checked here rather than trusted to produce a file
PgBouncer reads the way we meant.
"""

from __future__ import annotations

import base64
import hashlib
import re
from typing import Any, Literal

from ..api.databaseprofile import PGBOUNCER_PARAMETERS, PoolingSpec
from ..kube import ObjectRef
from .builders import LABEL_PREFIX, labels, object_meta

Role = Literal["rw", "ro"]

COMPONENT = "pooler"
ROLE_LABEL = f"{LABEL_PREFIX}/pooler-role"
CONFIG_HASH_ANNOTATION = f"{LABEL_PREFIX}/config-hash"
PORT = 5432
PORT_NAME = "pgbouncer"
CONFIG_DIR = "/etc/pgbouncer"
INI_KEY = "pgbouncer.ini"
USERLIST_KEY = "userlist.txt"
# A fixed non-root identity: images differ in their USER (often a name, which
# runAsNonRoot cannot verify), and fsGroup makes the Secret files readable to it.
RUN_AS_ID = 65532
# Drivers such as pgjdbc and asyncpg send extra_float_digits at startup; PgBouncer
# refuses unknown startup parameters unless they are listed here.
IGNORED_STARTUP_PARAMETERS: tuple[str, ...] = ("extra_float_digits",)

# libusual's ini parser accepts only these characters in a key, so the database
# alias (which clients pass as dbname) must consist of them; "*" would be the fallback.
_INI_KEY = re.compile(r"[A-Za-z0-9_.-]+")
# Characters that would end a line, start a comment or a new key, or close the quoted
# connection-string value PgBouncer parses; never needed in a host name or address.
_UNSAFE_HOST = re.compile(r"[\x00-\x20\x7f='\";#\\]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LIST_ITEM = re.compile(r"[^\x00-\x20\x7f,'\";#=\\]+")
# "pgbouncer" is the admin console's database; PgBouncer refuses it as an entry.
_RESERVED_DATABASES = frozenset({"pgbouncer"})


def pooler_name(profile: str, role: Role) -> str:
    """`<profile>-pooler-rw` / `-ro`: the Deployment's, Service's and Secret's name."""
    return f"{profile}-pooler-{role}"


def _check_dbname(dbname: str) -> str:
    if not _INI_KEY.fullmatch(dbname) or dbname in _RESERVED_DATABASES:
        raise ValueError(
            f"database name {dbname!r} cannot be served by PgBouncer: it must be non-empty, consist "
            "of letters, digits, '_', '.' or '-' (what its config parser accepts as a key) and not "
            "be 'pgbouncer'"
        )
    return dbname


def _check_host(host: str) -> str:
    if not host or _UNSAFE_HOST.search(host):
        raise ValueError(
            f"backend host {host!r} is empty or contains whitespace, a quote, '=', ';', '#' or a "
            "backslash, which would break pgbouncer.ini"
        )
    return host


def _check_line(what: str, value: str) -> str:
    """A value that ends the line it is on: only line breaks and control characters hurt."""
    if _CONTROL.search(value):
        raise ValueError(f"{what} {value!r} contains a line break or control character")
    return value


def _check_list(what: str, items: list[str]) -> str:
    for item in items:
        if not _LIST_ITEM.fullmatch(item):
            raise ValueError(f"{what}: {item!r} is not a plain name (no spaces, commas, quotes or '=')")
    return ",".join(items)


def _merge_ignored(user_value: str | None) -> str:
    """Ours first, then the user's, without duplicates: the user can add, never remove."""
    names = list(IGNORED_STARTUP_PARAMETERS)
    for item in (user_value or "").split(","):
        item = item.strip()
        if item and item not in names:
            names.append(item)
    return ",".join(names)


def pgbouncer_ini(
    spec: PoolingSpec,
    *,
    backend_host: str,
    backend_port: int,
    dbname: str,
    listen_port: int = PORT,
    auth_file: str,
    admin_users: list[str] | None = None,
    stats_users: list[str] | None = None,
    unix_socket_dir: str | None = None,
    listen_addr: str = "*",
) -> str:
    """A complete pgbouncer.ini serving one database; the same spec always gives the same text.

    SCRAM authentication is used towards clients (auth_file holds plain passwords or
    SCRAM secrets, never md5 hashes). Logging goes to stderr (the container log) and
    the Unix socket is off unless a directory is given, so nothing is written to disk.
    stats_users defaults to admin_users.
    """
    for port in (backend_port, listen_port):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range")
    unknown = sorted(set(spec.parameters) - set(PGBOUNCER_PARAMETERS))
    if unknown:
        raise ValueError(
            f"pooling.parameters: {', '.join(unknown)} not allowed; allowed keys: {', '.join(PGBOUNCER_PARAMETERS)}"
        )
    alias = _check_dbname(dbname)
    connstr = f"host='{_check_host(backend_host)}' port={backend_port} dbname='{alias}'"
    settings: list[tuple[str, str]] = [
        ("listen_addr", _check_list("listen_addr", [listen_addr])),
        ("listen_port", str(listen_port)),
        ("unix_socket_dir", _check_line("unix_socket_dir", unix_socket_dir or "")),
        ("auth_type", "scram-sha-256"),
        ("auth_file", _check_line("auth_file", auth_file)),
        ("pool_mode", spec.pool_mode),
        ("default_pool_size", str(spec.default_pool_size)),
        ("min_pool_size", str(spec.min_pool_size)),
        ("reserve_pool_size", str(spec.reserve_pool_size)),
        ("max_client_conn", str(spec.max_client_connections)),
        ("max_db_connections", str(spec.max_db_connections)),
        ("ignore_startup_parameters", _merge_ignored(spec.parameters.get("ignore_startup_parameters"))),
        ("logfile", ""),
        ("pidfile", ""),
        ("syslog", "0"),
    ]
    if admin_users:
        settings.append(("admin_users", _check_list("admin_users", admin_users)))
    stats = admin_users if stats_users is None else stats_users
    if stats:
        settings.append(("stats_users", _check_list("stats_users", stats)))
    for key in sorted(spec.parameters):
        if key != "ignore_startup_parameters":
            settings.append((key, _check_line(f"pooling.parameters.{key}", spec.parameters[key])))
    lines = [
        "; Generated by pgscale from the DatabaseProfile's pooling spec; edits are overwritten.",
        "[databases]",
        f"{alias} = {connstr}",
        "",
        "[pgbouncer]",
        *(f"{key} = {value}".rstrip() for key, value in settings),
    ]
    return "\n".join(lines) + "\n"


def userlist(user: str, password_or_scram: str) -> str:
    """One userlist.txt line: both fields double-quoted, a double quote written twice.

    Takes a plain password or a `SCRAM-SHA-256$...` secret; PgBouncer needs one of
    them to log in to the server on the client's behalf.
    """
    if not user:
        raise ValueError("userlist: the user name is empty")
    for what, value in (("user name", user), ("password", password_or_scram)):
        if _CONTROL.search(value):
            raise ValueError(f"userlist: the {what} contains a line break or control character")
    return '"{}" "{}"\n'.format(user.replace('"', '""'), password_or_scram.replace('"', '""'))


def config_hash(*texts: str) -> str:
    """16 hex digits of sha256 over the texts; as a pod annotation it rolls the Deployment on change."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "big"))  # ("ab", "c") and ("a", "bc") differ
        digest.update(data)
    return digest.hexdigest()[:16]


def _selector(owner: ObjectRef, role: Role) -> dict[str, str]:
    """Labels that pick one pooler's pods; fixed forever, since a Deployment's selector is immutable."""
    return {
        f"{LABEL_PREFIX}/{owner.kind.lower()}": owner.name,
        "app.kubernetes.io/component": COMPONENT,
        ROLE_LABEL: role,
    }


def _meta(owner: ObjectRef, name: str, role: Role) -> dict[str, Any]:
    meta = object_meta(owner, name, COMPONENT)
    meta["labels"][ROLE_LABEL] = role
    return meta


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def config_secret(owner: ObjectRef, name: str, ini: str, userlist: str, role: Role = "rw") -> dict[str, Any]:
    """A Secret, not a ConfigMap: userlist.txt holds the server password."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _meta(owner, name, role),
        "type": "Opaque",
        "data": {INI_KEY: _b64(ini), USERLIST_KEY: _b64(userlist)},
    }


def deployment(
    owner: ObjectRef,
    name: str,
    spec: PoolingSpec,
    image: str,
    secret_name: str,
    config_hash: str,
    role: Role,
) -> dict[str, Any]:
    """PgBouncer pods reading their config from the Secret; a new hash in the template rolls them.

    `image` is the operator's default, used unless the spec names one. Rolling updates
    add a pod before removing one, so the Service keeps at least `instances` poolers.
    """
    pod_labels = {**labels(owner, COMPONENT), ROLE_LABEL: role}
    container: dict[str, Any] = {
        "name": "pgbouncer",
        "image": spec.image or image,
        "command": ["pgbouncer", f"{CONFIG_DIR}/{INI_KEY}"],
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "tcpSocket": {"port": PORT},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "config", "mountPath": CONFIG_DIR, "readOnly": True}],
    }
    if spec.resources:
        container["resources"] = spec.resources.wire()
    pod_spec: dict[str, Any] = {
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_ID,
            "runAsGroup": RUN_AS_ID,
            "fsGroup": RUN_AS_ID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "automountServiceAccountToken": False,
        "containers": [container],
        "volumes": [{"name": "config", "secret": {"secretName": secret_name, "defaultMode": 0o440}}],
    }
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, role),
        "spec": {
            "replicas": spec.instances,
            "selector": {"matchLabels": _selector(owner, role)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": {CONFIG_HASH_ANNOTATION: config_hash}},
                "spec": pod_spec,
            },
        },
    }


def service(owner: ObjectRef, name: str, role: Role) -> dict[str, Any]:
    """The ClusterIP Service applications connect to instead of the database."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(owner, name, role),
        "spec": {
            "type": "ClusterIP",
            "selector": _selector(owner, role),
            "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
