"""What every object pgscale owns shares (names, labels, owner references), and the Jobs and
CronJobs that run the policies' commands."""

from __future__ import annotations

import json
from typing import Any

from ..api.common import JobTemplate
from ..api.databaseprofile import DatabaseProfileSpec, SecretKeys
from ..api.filemigration import Destination
from ..kube import ObjectRef
from ..storage import FS_MOUNT

Volume = tuple[dict[str, Any], dict[str, Any]]  # (pod volume, container mount)

# The job reads its input from these variables, so its pod needs no Kubernetes API access.
ENV_JOB_INPUT = "PGSCALE_JOB_INPUT"
# env var -> field of SecretKeys (or a literal key name) that holds that part of the connection
ENV_SECRET_KEYS: dict[str, str] = {
    "PGSCALE_DB_URI": "uri",
    "PGSCALE_DB_HOST": "host",
    "PGSCALE_DB_PORT": "port",
    "PGSCALE_DB_DBNAME": "dbname",
    "PGSCALE_DB_USER": "user",
    "PGSCALE_DB_USER_ALT": "=user",
    "PGSCALE_DB_PASSWORD": "password",
}


def secret_key_for(keys: SecretKeys, field: str) -> str:
    """The Secret key an ENV_SECRET_KEYS entry reads ("=x" names the key x literally)."""
    return field[1:] if field.startswith("=") else str(getattr(keys, field))


def job_env(
    owner: ObjectRef, spec: dict[str, Any], profile: DatabaseProfileSpec, options: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The job's input: the policy and connection spec as JSON, credentials from the Secret."""
    keys = profile.connection.secret_ref.keys or SecretKeys()
    job_input = {
        "namespace": owner.namespace,
        "name": owner.name,
        "spec": spec,
        "profile": {"connection": profile.connection.wire(), "stateSchema": profile.state_schema},
        "options": options or {},
    }
    env: list[dict[str, Any]] = [{"name": ENV_JOB_INPUT, "value": json.dumps(job_input, sort_keys=True)}]
    for name, field in ENV_SECRET_KEYS.items():
        ref = {"name": profile.connection.secret_ref.name, "key": secret_key_for(keys, field), "optional": True}
        env.append({"name": name, "valueFrom": {"secretKeyRef": ref}})
    return env


MANAGED_BY = "pgscale"
LABEL_PREFIX = "pgscale.io"


def labels(owner: ObjectRef, component: str) -> dict[str, str]:
    """Labels on everything pgscale creates for a resource."""
    return {
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "app.kubernetes.io/component": component,
        f"{LABEL_PREFIX}/{owner.kind.lower()}": owner.name,
    }


def owner_reference(owner: ObjectRef) -> dict[str, Any]:
    """Makes the object garbage-collected with its owner (by the controller-manager)."""
    return {
        "apiVersion": owner.api_version,
        "kind": owner.kind,
        "name": owner.name,
        "uid": owner.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def object_meta(owner: ObjectRef, name: str, component: str) -> dict[str, Any]:
    """Metadata of an owned object."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": labels(owner, component),
        "ownerReferences": [owner_reference(owner)],
    }


def job_name(owner: ObjectRef, suffix: str) -> str:
    """A stable, DNS-safe name for a Job or CronJob of a resource (<= 52 chars for CronJobs)."""
    base = f"{owner.name}-{suffix}"
    return base if len(base) <= 52 else base[:43].rstrip("-") + "-" + owner.uid.replace("-", "")[:8]


def job_pod_spec(
    template: JobTemplate | None,
    default_image: str,
    args: list[str],
    component: str,
    owner: ObjectRef,
    env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The pod template that runs `pgscale job ...` as a non-root, read-only container."""
    template = template or JobTemplate()
    container: dict[str, Any] = {
        "name": "pgscale",
        "image": template.image or default_image,
        "args": args,
        "env": [
            {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "PGSCALE_LOG_FORMAT", "value": "json"},
            *(env or []),
        ],
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],  # noqa: S108 - an emptyDir, not the host
    }
    if template.image_pull_policy:
        container["imagePullPolicy"] = template.image_pull_policy
    if template.resources:
        container["resources"] = template.resources.wire()
    spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if template.service_account_name:
        spec["serviceAccountName"] = template.service_account_name
    return {"metadata": {"labels": labels(owner, component)}, "spec": spec}


# A pod deleted or evicted mid-run (a drain, a preemption, `kubectl delete pod`) finishes the rows in
# flight on SIGTERM and exits; every pgscale job resumes where the last one stopped. So the Job waits
# for that pod to end before it makes another (two pods of one Job never overlap), and a disruption
# does not count against backoffLimit: a few evictions in a row must not fail the Job (seen on the
# node: each deleted pod that was still terminating cost one retry).
JOB_DISRUPTION_POLICY: dict[str, Any] = {
    "podReplacementPolicy": "Failed",
    "podFailurePolicy": {
        "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
    },
}


def job_spec(template: JobTemplate, pod: dict[str, Any], active_deadline_seconds: int | None = None) -> dict[str, Any]:
    """The spec every pgscale Job has, standalone or from a CronJob."""
    spec: dict[str, Any] = {
        "backoffLimit": template.backoff_limit,
        "ttlSecondsAfterFinished": template.ttl_seconds_after_finished,
        **json.loads(json.dumps(JOB_DISRUPTION_POLICY)),  # a copy: callers may change what they get
        "template": pod,
    }
    if active_deadline_seconds:
        spec["activeDeadlineSeconds"] = active_deadline_seconds
    return spec


def destination_env(destination: Destination | None) -> tuple[list[dict[str, Any]], list[Volume]]:
    """What a job pod needs to write to a destination (FileMigration's model): the access keys from
    their Secret as AWS_* variables, or the volume mounted at FS_MOUNT."""
    if destination is None:
        return [], []
    env: list[dict[str, Any]] = []
    volumes: list[Volume] = []
    s3 = destination.s3
    if s3 and s3.credentials_secret_ref:
        creds = s3.credentials_secret_ref
        env += [
            secret_env("AWS_ACCESS_KEY_ID", creds.name, creds.access_key_id_key),
            secret_env("AWS_SECRET_ACCESS_KEY", creds.name, creds.secret_access_key_key),
        ]
    if destination.filesystem:
        claim = {"claimName": destination.filesystem.claim_name}
        volumes.append(({"name": "files", "persistentVolumeClaim": claim}, {"name": "files", "mountPath": FS_MOUNT}))
    return env, volumes


def _mount(pod: dict[str, Any], volumes: list[Volume] | None) -> dict[str, Any]:
    for volume, mount in volumes or []:
        pod["spec"]["volumes"].append(volume)
        pod["spec"]["containers"][0]["volumeMounts"].append(mount)
    return pod


def cron_job(
    owner: ObjectRef,
    *,
    suffix: str,
    schedule: str,
    time_zone: str | None,
    suspend: bool,
    args: list[str],
    template: JobTemplate | None,
    default_image: str,
    active_deadline_seconds: int | None = None,
    env: list[dict[str, Any]] | None = None,
    volumes: list[Volume] | None = None,
) -> dict[str, Any]:
    """A CronJob running one `pgscale job` command; one run at a time, never overlapping."""
    template = template or JobTemplate()
    spec: dict[str, Any] = {
        "schedule": schedule,
        "suspend": suspend,
        "concurrencyPolicy": "Forbid",
        "startingDeadlineSeconds": 3600,
        "successfulJobsHistoryLimit": 3,
        "failedJobsHistoryLimit": 3,
        "jobTemplate": {
            "metadata": {"labels": labels(owner, suffix)},
            "spec": job_spec(
                template,
                _mount(job_pod_spec(template, default_image, args, suffix, owner, env), volumes),
                active_deadline_seconds,
            ),
        },
    }
    if time_zone:
        spec["timeZone"] = time_zone
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": object_meta(owner, job_name(owner, suffix), suffix),
        "spec": spec,
    }


def job(
    owner: ObjectRef,
    *,
    name: str,
    suffix: str,
    args: list[str],
    template: JobTemplate | None,
    default_image: str,
    env: list[dict[str, Any]] | None = None,
    volumes: list[Volume] | None = None,
) -> dict[str, Any]:
    """A Job running one `pgscale job` command once; `volumes` are (volume, mount) pairs."""
    template = template or JobTemplate()
    pod = _mount(job_pod_spec(template, default_image, args, suffix, owner, env), volumes)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(owner, name, suffix),
        "spec": job_spec(template, pod),
    }


def secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    """An environment variable from a Secret key (required: the pod does not start without it)."""
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def job_args(command: str, owner: ObjectRef) -> list[str]:
    """Arguments of `pgscale job <command>` for a resource."""
    return ["job", command, "--namespace", owner.namespace, "--name", owner.name]
