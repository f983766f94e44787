"""Argo CD's health check for pgscale's kinds, executed by a real Lua 5.1 (Argo CD's gopher-lua is 5.1)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import lupa.lua51 as lua51  # type: ignore[import-untyped]
import pytest
import yaml

from pgscale.api import GROUP, KINDS

ARGOCD = Path(__file__).resolve().parents[2] / "manifests" / "argocd"
SCRIPT = (ARGOCD / "health.lua").read_text()


def argo_health(obj: dict[str, Any], script: str = SCRIPT) -> dict[str, str]:
    """Run a health script as Argo CD does: the resource in the global `obj`, a {status, message} table back."""
    lua = lua51.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(script)
    return {str(k): str(v) for k, v in result.items()}


def generator() -> Any:
    spec = importlib.util.spec_from_file_location("argocd_generate", ARGOCD / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def cond(ctype: str, status: str, reason: str, message: str = "") -> dict[str, Any]:
    return {
        "type": ctype,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2025-01-01T00:00:00Z",
        "observedGeneration": 3,
    }


def resource(
    conditions: list[dict[str, Any]] | None,
    *,
    observed: int | None = 3,
    generation: int = 3,
    kind: str = "RetentionPolicy",
    **spec: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "pgscale.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": "x", "namespace": "ns", "generation": generation},
        "spec": {"profileRef": {"name": "app"}, **spec},
    }
    if conditions is not None or observed is not None:
        obj["status"] = {}
        if observed is not None:
            obj["status"]["observedGeneration"] = observed
        if conditions is not None:
            obj["status"]["conditions"] = conditions
    return obj


READY = cond("Ready", "True", "Scheduled", "next run 2025-02-01T02:00:00Z")
STALLED = [
    cond("Ready", "False", "TableNotFound", "spec.table: missing"),
    cond("Stalled", "True", "TableNotFound", "spec.table: missing"),
]
RECONCILING = [
    cond("Ready", "False", "Copying", "Copying: 5/10 rows"),
    cond("Reconciling", "True", "Copying", "Copying: 5/10 rows"),
]


@pytest.mark.parametrize(
    ("obj", "status", "message"),
    [
        (
            {"kind": "FileMigration", "metadata": {"name": "x", "generation": 1}, "spec": {}},
            "Progressing",
            "Waiting for the pgscale operator to report on this resource",
        ),
        (resource(None, observed=None), "Progressing", "Waiting for the pgscale operator to report on this resource"),
        (resource([READY], observed=2), "Progressing", "Waiting for the pgscale operator to observe generation 3"),
        (resource(STALLED, observed=2), "Progressing", "Waiting for the pgscale operator to observe generation 3"),
        (resource(STALLED), "Degraded", "TableNotFound: spec.table: missing"),
        (resource(RECONCILING), "Progressing", "Copying: Copying: 5/10 rows"),
        (resource([READY]), "Healthy", "Scheduled: next run 2025-02-01T02:00:00Z"),
        (resource([cond("Ready", "True", "Connected")], kind="DatabaseProfile"), "Healthy", "Connected"),
        (
            resource([cond("Ready", "Unknown", "Reconciling", "Reconciling generation 3")]),
            "Progressing",
            "Reconciling: Reconciling generation 3",
        ),
        (
            resource([cond("Ready", "False", "Waiting", "connection refused")]),
            "Progressing",
            "Waiting: connection refused",
        ),
        (resource([]), "Progressing", "Waiting for the Ready condition"),
        # Suspended: after Degraded, before what a suspended resource may still report.
        (
            resource([cond("Ready", "True", "Scheduled", "suspended")], suspend=True),
            "Suspended",
            "Scheduled: suspended",
        ),
        (resource(RECONCILING, kind="FileMigration", suspend=True), "Suspended", "Copying: Copying: 5/10 rows"),
        (resource(STALLED, suspend=True), "Degraded", "TableNotFound: spec.table: missing"),
        (resource([READY], suspend=False), "Healthy", "Scheduled: next run 2025-02-01T02:00:00Z"),
    ],
)
def test_health(obj: dict[str, Any], status: str, message: str) -> None:
    assert argo_health(obj) == {"status": status, "message": message}


def test_conditions_in_any_order_and_false_ones_ignored() -> None:
    conditions = [cond("Stalled", "False", "Old"), cond("Reconciling", "False", "Old"), READY]
    assert argo_health(resource(conditions))["status"] == "Healthy"


def test_patch_is_current_and_covers_every_kind() -> None:
    gen = generator()
    patch = (ARGOCD / "argocd-cm-patch.yaml").read_text()
    assert patch == gen.render(), "stale: run `uv run python manifests/argocd/generate.py`"
    data = yaml.safe_load(patch)
    assert data["kind"] == "ConfigMap" and data["metadata"] == {"name": "argocd-cm"}
    assert set(data["data"]) == {f"resource.customizations.health.{GROUP}_{k.name}" for k in KINDS}
    for script in data["data"].values():
        assert script == SCRIPT  # the YAML block holds the script byte for byte
        assert argo_health(resource([READY]), script)["status"] == "Healthy"


def test_generator_check_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen = generator()
    monkeypatch.setattr(gen, "PATCH", tmp_path / "patch.yaml")
    assert gen.main(["--check"]) == 1
    assert gen.main([]) == 0
    assert gen.main(["--check"]) == 0
    assert (tmp_path / "patch.yaml").read_text() == patch_text(gen)


def patch_text(gen: Any) -> str:
    return str(gen.render())
