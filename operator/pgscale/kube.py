"""Kubernetes I/O: the only module that talks to the API server (besides kopf's watches).

Owned objects are written with server-side apply under one field manager, so
a reconcile states the whole desired object and the API server computes the
change; fields other managers own (an HPA's replicas, a user's label) stay.
The permissions these calls need are declared in rbac.py (the chart's roles come from it).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from .api import GROUP, VERSION, Kind
from .conditions import now_rfc3339
from .redact import redact, redact_any, remember_secret

log = logging.getLogger(__name__)

FIELD_MANAGER = "pgscale"
# (apiVersion, kind) -> plural, for every kind pgscale creates.
_OWNED: dict[tuple[str, str], str] = {
    ("v1", "ConfigMap"): "configmaps",
    ("v1", "Secret"): "secrets",
    ("v1", "Service"): "services",
    ("discovery.k8s.io/v1", "EndpointSlice"): "endpointslices",
    ("apps/v1", "Deployment"): "deployments",
    ("apps/v1", "StatefulSet"): "statefulsets",
    ("batch/v1", "Job"): "jobs",
    ("batch/v1", "CronJob"): "cronjobs",
    ("policy/v1", "PodDisruptionBudget"): "poddisruptionbudgets",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "prometheusrules",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitors",
    ("postgresql.cnpg.io/v1", "Pooler"): "poolers",
}
# Objects someone else owns, of which pgscale applies a few fields under a field manager of its
# own and never forces (apply_shared): a CloudNativePG Cluster's parameters and instances.
_SHARED: dict[tuple[str, str], str] = {
    ("postgresql.cnpg.io/v1", "Cluster"): "clusters",
}


def load_config() -> None:
    """In a pod, the ServiceAccount; elsewhere $KUBECONFIG or ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    else:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def _path(api_version: str, plural: str, namespace: str, name: str | None = None) -> str:
    base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
    path = f"{base}/namespaces/{namespace}/{plural}"
    return f"{path}/{name}" if name else path


@dataclass(frozen=True)
class ObjectRef:
    """Enough of an object to name it in an Event or an owner reference."""

    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, obj: dict[str, Any]) -> ObjectRef:
        meta = obj["metadata"]
        return cls(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"], meta.get("uid", ""))


class Kube:
    """A thin, synchronous client; safe to share between worker threads."""

    def __init__(self, api_client: client.ApiClient | None = None) -> None:
        self.api = api_client or client.ApiClient()
        # Secrets and Events go through _request: kubernetes' CoreV1Api module alone adds ~70 MB to the process.
        self.custom = client.CustomObjectsApi(self.api)
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()

    # --- pgscale resources -------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """A pgscale resource, or None when it does not exist."""
        try:
            obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, kind.plural, name)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return cast("dict[str, Any]", obj)

    def list_resources(self, kind: Kind, namespace: str) -> list[dict[str, Any]]:
        """Every resource of a kind in a namespace."""
        result = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, kind.plural)
        return list(cast("dict[str, Any]", result).get("items", []))

    def list_watched(self, kind: Kind, namespaces: list[str]) -> list[dict[str, Any]]:
        """Every resource of a kind the operator watches: in every namespace, or in the named ones."""
        if namespaces:
            return [obj for ns in namespaces for obj in self.list_resources(kind, ns)]
        result = self.custom.list_cluster_custom_object(GROUP, VERSION, kind.plural)
        return list(cast("dict[str, Any]", result).get("items", []))

    def patch_status(self, kind: Kind, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch the status subresource (lists, like conditions, are replaced whole)."""
        try:
            self.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, kind.plural, name, {"status": redact_any(status)}
            )
        except ApiException as exc:
            if exc.status != 404:  # deleted meanwhile: nothing to report on
                raise

    def patch_metadata(self, kind: Kind, namespace: str, name: str, metadata: dict[str, Any]) -> None:
        """Merge-patch metadata (finalizers, annotations)."""
        self.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, kind.plural, name, {"metadata": metadata})

    # --- core objects ------------------------------------------------------------------

    def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's data, decoded as UTF-8; None when it does not exist."""
        found = self.read_secret_and_labels(namespace, name)
        return found[0] if found is not None else None

    def read_secret_and_labels(self, namespace: str, name: str) -> tuple[dict[str, str], dict[str, str]] | None:
        """A Secret's data, decoded as UTF-8, and its labels (CloudNativePG's name the Cluster); None when
        it does not exist."""
        secret = self._secret(namespace, name)
        if secret is None:
            return None
        data = secret.get("data") or {}
        decoded = {k: base64.b64decode(v).decode("utf-8", errors="replace") for k, v in data.items()}
        remember_secret(decoded)  # from now on redacted from every message (redact.py)
        labels = dict((secret.get("metadata") or {}).get("labels") or {})
        return decoded, labels

    def _secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret as the API server sends it (data base64-encoded), or None when it does not exist."""
        try:
            return dict(self._request("GET", _path("v1", "secrets", namespace, name)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> Any:
        """One raw API call (for kinds the typed client has no method for, and apply)."""
        if content_type.endswith("+yaml") and body is not None:
            # JSON is YAML, except that the API server's YAML decoder refuses JSON's surrogate-pair escape of
            # a character outside the BMP (an emoji from a spec): send the JSON as UTF-8 text instead.
            body = json.dumps(body, ensure_ascii=False).encode()
        _, url, headers, payload, post = self.api.param_serialize(
            method,
            path,
            query_params=query or [],
            body=body,
            auth_settings=["BearerToken"],
            header_params={"Content-Type": content_type, "Accept": "application/json"},
        )
        response = self.api.call_api(
            method, url, header_params=headers, body=payload, post_params=post, _request_timeout=timeout
        )
        response.read()  # type: ignore[no-untyped-call]
        if not 200 <= response.status <= 299:
            raise ApiException(http_resp=response)
        return json.loads(response.data) if response.data else None

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply an object pgscale owns; returns the object as stored."""
        meta = obj["metadata"]
        path = _path(obj["apiVersion"], _OWNED[(obj["apiVersion"], obj["kind"])], meta["namespace"], meta["name"])
        query = [("fieldManager", FIELD_MANAGER), ("force", "true")]
        return dict(self._request("PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml"))

    def read(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """Any object of an owned kind, or None."""
        try:
            return dict(self._request("GET", _path(api_version, _OWNED[(api_version, kind)], namespace, name)))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete an owned object (foreground: its pods go first); False when it was gone."""
        path = _path(api_version, _OWNED[(api_version, kind)], namespace, name)
        try:
            self._request("DELETE", path, body={"propagationPolicy": "Foreground"})
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    # --- objects pgscale changes only in part ------------------------------------------

    def read_shared(self, api_version: str, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A shared object, or None when it does not exist; a kind not installed raises (see kind_missing)."""
        try:
            return dict(self._request("GET", _path(api_version, _SHARED[(api_version, kind)], namespace, name)))
        except ApiException as exc:
            if exc.status == 404 and not kind_missing(exc):
                return None
            raise

    def apply_shared(self, obj: dict[str, Any], manager: str) -> dict[str, Any]:
        """Server-side apply of the fields `manager` owns in an object someone else owns, without force:
        a field another manager holds with another value is refused with a 409 (kube.conflicts reads it),
        and a field the manager applied before and omits now is released."""
        meta = obj["metadata"]
        plural = _SHARED[(obj["apiVersion"], obj["kind"])]
        path = _path(obj["apiVersion"], plural, meta["namespace"], meta["name"])
        query = [("fieldManager", manager), ("fieldValidation", "Strict")]
        return dict(self._request("PATCH", path, query=query, body=obj, content_type="application/apply-patch+yaml"))

    def json_patch_shared(
        self, api_version: str, kind: str, namespace: str, name: str, ops: list[Any], manager: str
    ) -> dict[str, Any]:
        """A JSON patch (RFC 6902) of a shared object: for removals server-side apply cannot make (kube.cnpg)."""
        path = _path(api_version, _SHARED[(api_version, kind)], namespace, name)
        query = [("fieldManager", manager)]
        return dict(self._request("PATCH", path, query=query, body=ops, content_type="application/json-patch+json"))

    def secret_labels(self, namespace: str, name: str) -> dict[str, str] | None:
        """A Secret's labels (its data is not read here); None when it does not exist."""
        secret = self._secret(namespace, name)
        if secret is None:
            return None
        return dict((secret.get("metadata") or {}).get("labels") or {})

    # --- events ------------------------------------------------------------------------

    def event(self, ref: ObjectRef, reason: str, message: str, *, warning: bool = False) -> None:
        """Record an Event on a resource; failures are logged, never raised."""
        now = now_rfc3339()
        body = {
            "metadata": {"generateName": f"{ref.name}.", "namespace": ref.namespace},
            "involvedObject": {
                "apiVersion": ref.api_version,
                "kind": ref.kind,
                "name": ref.name,
                "namespace": ref.namespace,
                "uid": ref.uid,
            },
            "reason": reason,
            "message": redact(message)[:1024],
            "type": "Warning" if warning else "Normal",
            "source": {"component": "pgscale"},
            "reportingComponent": "pgscale.io/operator",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._request("POST", _path("v1", "events", ref.namespace), body=body)
        except ApiException as exc:
            log.warning("could not record event %s on %s/%s: %s", reason, ref.namespace, ref.name, exc.reason)


def status_body(exc: ApiException) -> dict[str, Any]:
    """The Status object of an API server refusal (empty when it sent none)."""
    try:
        body = json.loads(exc.body) if exc.body else {}
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def kind_missing(exc: ApiException) -> bool:
    """A 404 for the kind itself (its CRD is not installed), not for one object of it."""
    return exc.status == 404 and not (status_body(exc).get("details") or {}).get("name")


def api_error(exc: ApiException) -> tuple[str, str]:
    """(reason, one-line message) of an API server refusal, from its Status body, without HTTP headers."""
    message = str(exc.reason or "")
    try:
        body = json.loads(exc.body) if exc.body else {}
        message = str(body.get("message") or message)
    except (ValueError, TypeError):
        pass
    if exc.status == 403:
        return "Forbidden", (
            f"the Kubernetes API refused: {message}; the operator's ServiceAccount lacks this permission "
            "(see docs/operations.md, RBAC, and operator/pgscale/rbac.py)"
        )
    return "KubernetesAPIError", f"the Kubernetes API answered {exc.status}: {message}"
