"""`pgscale job ...`: the commands pgscale's Jobs and CronJobs run, also runnable by hand.

In a pod, a job reads its input from the environment the operator rendered
(``PGSCALE_JOB_INPUT`` plus Secret-backed ``PGSCALE_DB_*`` variables), so the
pod needs no Kubernetes API access. By hand, it reads the resource, its
DatabaseProfile and the Secret through your kubeconfig.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

from ..api import DATABASE_PROFILE, Kind
from ..api.databaseprofile import ConnectionSpec, DatabaseProfileSpec, SecretKeys
from ..errors import DependencyError, ReconcileError
from ..pg.connection import ConnInfo, resolve
from ..specs.builders import ENV_JOB_INPUT, ENV_SECRET_KEYS, secret_key_for


@dataclass(frozen=True)
class JobInput:
    """What a job works on: the resource's spec, and the database to reach."""

    namespace: str
    name: str
    spec: dict[str, Any]
    state_schema: str
    conn: ConnInfo
    options: dict[str, Any] = field(default_factory=dict)  # decided by the operator, e.g. ownership

    @property
    def policy_key(self) -> str:
        """How the resource is named in pgscale's tables."""
        return f"{self.namespace}/{self.name}"


def from_env(environ: dict[str, str] | None = None) -> JobInput | None:
    """The input rendered into the pod, or None outside a pgscale pod."""
    env = dict(os.environ if environ is None else environ)
    raw = env.get(ENV_JOB_INPUT)
    if not raw:
        return None
    data = json.loads(raw)
    connection = ConnectionSpec.model_validate(data["profile"]["connection"])
    keys = connection.secret_ref.keys or SecretKeys()
    secret = {
        secret_key_for(keys, field): env[name]
        for name, field in ENV_SECRET_KEYS.items()
        if env.get(name) not in (None, "")
    }
    return JobInput(
        namespace=data["namespace"],
        name=data["name"],
        spec=data["spec"],
        state_schema=data["profile"]["stateSchema"],
        conn=resolve(connection, secret, connection.secret_ref.name),
        options=data.get("options", {}),
    )


def from_api(kind: Kind, namespace: str, name: str) -> JobInput:
    """The input read through the Kubernetes API (running by hand); a refusal is one clear line, not a
    traceback (seen on the node: a pod whose spec lost PGSCALE_JOB_INPUT fell back to the API as its
    ServiceAccount and crashed with a 403)."""
    from kubernetes.client.exceptions import ApiException

    try:
        return _from_api(kind, namespace, name)
    except ApiException as exc:
        if exc.status not in (401, 403):
            raise
        raise DependencyError(
            f"no {ENV_JOB_INPUT} in the environment, and reading {kind.plural} {namespace}/{name} through the "
            f"Kubernetes API was refused ({exc.status} {exc.reason}). In a pod pgscale created the input is in "
            f"{ENV_JOB_INPUT}: its absence means the pod spec was changed; by hand, the identity needs get on "
            f"{kind.plural}, databaseprofiles and secrets in {namespace}",
            reason="Forbidden",
        ) from exc


def _from_api(kind: Kind, namespace: str, name: str) -> JobInput:
    from ..kube import Kube, load_config

    load_config()
    kube = Kube()
    obj = kube.get(kind, namespace, name)
    if obj is None:
        raise DependencyError(f"{kind.name} {namespace}/{name} not found", reason="NotFound")
    profile_name = obj["spec"]["profileRef"]["name"]
    profile = kube.get(DATABASE_PROFILE, namespace, profile_name)
    if profile is None:
        raise DependencyError(f"DatabaseProfile {namespace}/{profile_name} not found", reason="ProfileNotFound")
    pspec = DatabaseProfileSpec.model_validate(profile["spec"])
    secret = kube.read_secret(namespace, pspec.connection.secret_ref.name)
    if secret is None:
        raise DependencyError(f"Secret {namespace}/{pspec.connection.secret_ref.name} not found")
    return JobInput(
        namespace=namespace,
        name=name,
        spec=obj["spec"],
        state_schema=pspec.state_schema,
        conn=resolve(pspec.connection, secret, pspec.connection.secret_ref.name),
    )


def start(kind: Kind, command: str, namespace: str | None, name: str | None) -> tuple[JobInput, threading.Event] | None:
    """What every `pgscale job` does first: SIGTERM stops after the current unit of work,
    and the input is loaded (None, with the reason on stderr, when it cannot be)."""
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        return load(kind, namespace, name), stop
    except ReconcileError as exc:
        print(f"pgscale job {command}: {exc.message}", file=sys.stderr)
        return None


def load(kind: Kind, namespace: str | None, name: str | None) -> JobInput:
    """From the pod's environment when present, else from the API."""
    found = from_env()
    if found is not None:
        return found
    if not namespace or not name:
        raise DependencyError(f"outside a pod, give --namespace and --name of the {kind.name}")
    return from_api(kind, namespace, name)
