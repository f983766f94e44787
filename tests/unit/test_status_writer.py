"""Status is written through the kinds' status models: a field the model lacks fails here, not in a cluster
(where the API server would prune it without a word)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from pgscale.api import FILE_MIGRATION, PARTITION_POLICY, Kind
from pgscale.api.filemigration import FileMigrationStatus
from pgscale.api.partitionpolicy import MaintenanceRun, PartitionPolicyStatus, ProgressStatus
from pgscale.controllers import base

CONTROLLERS = Path(base.__file__).resolve().parent


class FakeKube:
    def __init__(self) -> None:
        self.patches: list[dict[str, Any]] = []

    def patch_status(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any]) -> None:
        self.patches.append(patch)


def writer(kind: Kind = PARTITION_POLICY, status: dict[str, Any] | None = None) -> tuple[base.StatusWriter, FakeKube]:
    kube = FakeKube()
    obj = {"metadata": {"namespace": "ns", "name": "p", "generation": 2}, "status": status or {}}
    return base.StatusWriter(kube, kind, obj), kube  # type: ignore[arg-type]


def test_fields_go_out_by_their_wire_names_and_none_removes_one() -> None:
    status, kube = writer(status={"partitioned": False, "conversion": {"step": "prepared", "etaSeconds": 4}})
    status.update(PartitionPolicyStatus(partition_count=3, conversion=ProgressStatus(step="done")))
    status.update(PartitionPolicyStatus(partitioned=None))
    status.flush()
    # A nested key the new value lacks is removed, as when the whole object is replaced.
    assert kube.patches == [
        {"partitionCount": 3, "conversion": {"step": "done", "etaSeconds": None}, "partitioned": None}
    ]
    status.flush()
    assert len(kube.patches) == 1  # nothing changed since


def test_only_the_fields_given_are_written() -> None:
    status, kube = writer(status={"partitionCount": 7, "nextMaintenanceTime": "2026-01-01T00:00:00Z"})
    status.update(PartitionPolicyStatus(last_maintenance=MaintenanceRun(time="2026-01-01T01:00:00Z")))
    status.flush()
    assert kube.patches == [{"lastMaintenance": {"time": "2026-01-01T01:00:00Z"}}]  # defaults unsent, as given
    assert status.read(PartitionPolicyStatus).partition_count == 7


def test_reading_ignores_a_field_the_model_no_longer_has() -> None:
    status, _ = writer(FILE_MIGRATION, {"phase": "Copying", "lastError": "from an older version"})
    assert status.read(FileMigrationStatus).phase == "Copying"


def test_a_misspelt_field_fails() -> None:
    with pytest.raises(ValidationError):
        PartitionPolicyStatus(partition_cnt=3)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        PartitionPolicyStatus.model_validate({"partitionCnt": 3})
    status, _ = writer()
    status.status["partitionCnt"] = 3  # written around the models
    with pytest.raises(ValueError, match="partitionCnt"):
        status.flush()


def test_another_kinds_status_is_refused() -> None:
    status, _ = writer(FILE_MIGRATION)
    with pytest.raises(TypeError):
        status.update(PartitionPolicyStatus(partitioned=True))
    with pytest.raises(TypeError):
        status.read(PartitionPolicyStatus)
    status.update(FileMigrationStatus(phase="Copying"))


def written_fields(path: Path) -> list[tuple[int, type[BaseModel], str]]:
    """Every keyword and attribute a controller sets on a status model, with the model."""
    module = importlib.import_module(f"pgscale.controllers.{path.stem}")
    out: list[tuple[int, type[BaseModel], str]] = []
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            model = getattr(module, node.func.id, None)
            if isinstance(model, type) and issubclass(model, BaseModel):
                out += [(node.lineno, model, kw.arg) for kw in node.keywords if kw.arg]
    for function in ast.walk(tree):
        if not isinstance(function, ast.FunctionDef):
            continue
        typed: dict[str, type[BaseModel]] = {}  # local name -> model, from `x = Model(...)`
        for node in ast.walk(function):
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Name)
            ):
                model = getattr(module, node.value.func.id, None)
                if isinstance(model, type) and issubclass(model, BaseModel):
                    typed.update({t.id: model for t in node.targets if isinstance(t, ast.Name)})
        for node in ast.walk(function):
            if isinstance(node, ast.Assign):
                for t in node.targets:
                    for sub in ast.walk(t):
                        if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id in typed:
                            out.append((node.lineno, typed[sub.value.id], sub.attr))
    return out


@pytest.mark.parametrize("path", sorted(CONTROLLERS.glob("*.py")), ids=lambda p: p.name)
def test_every_status_field_a_controller_writes_is_in_its_model(path: Path) -> None:
    missing = [
        f"{path.name}:{line}: {model.__name__}.{name}"
        for line, model, name in written_fields(path)
        if name not in model.model_fields
    ]
    assert not missing, missing


def test_controllers_write_no_camelcase_dicts() -> None:
    """status.update takes a status model; a dict of camelCase keys would bypass it."""
    for path in CONTROLLERS.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "update"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "status"
            ):
                assert not node.keywords and not any(isinstance(a, ast.Dict) for a in node.args), (
                    f"{path.name}:{node.lineno}: {ast.unparse(node)}"
                )
        assert "status.status[" not in path.read_text(), path.name


def test_the_scan_sees_controller_writes() -> None:
    fields = {(model.__name__, name) for _, model, name in written_fields(CONTROLLERS / "filemigration.py")}
    assert ("FileMigrationStatus", "rows_migrated") in fields and ("FailedRow", "reason") in fields
    fields = {(model.__name__, name) for _, model, name in written_fields(CONTROLLERS / "databaseprofile.py")}
    assert ("CapacityStatus", "growth_bytes_per_month") in fields  # set after construction


def test_the_conversion_step_is_one_of_the_state_rows_phases() -> None:
    from typing import get_args

    from pgscale.api.partitionpolicy import ConversionStep
    from pgscale.pg import conversion as sqlc

    assert sqlc.Phase is ConversionStep  # one list of words, in the state row and in status
    assert set(sqlc.IN_FLIGHT) < set(get_args(ConversionStep))
    assert ProgressStatus(step="swapped").step == "swapped"
    with pytest.raises(ValidationError):
        ProgressStatus(step="copying")
    with pytest.raises(ValidationError):
        PartitionPolicyStatus.model_validate({"conversion": {"step": "Copying"}})


def test_conditions_set_again_as_they_are_send_nothing() -> None:
    from pgscale import conditions as cond

    stored = {"type": "Ready", "status": "True", "reason": "Connected", "message": "ok", "observedGeneration": 2}
    stored["lastTransitionTime"] = "2026-01-01T00:00:00Z"
    status, kube = writer(status={"observedGeneration": 2, "conditions": [stored]})
    assert status.observed_generation == 2 and status.conditions[0].reason == "Connected"
    status.conditions = cond.ready(status.conditions, "Connected", "ok", 2)
    status.flush()
    assert kube.patches == []
    status.conditions = cond.stalled(status.conditions, "SecretNotFound", "gone", 2)
    status.flush()
    assert [c["type"] for c in kube.patches[0]["conditions"]] == ["Ready", "Stalled"]


def status_wire_names() -> set[str]:
    """The camelCase wire names of every status field, nested ones included."""
    from typing import get_args

    from pgscale import api

    names: set[str] = set()
    seen: set[type[BaseModel]] = set()
    todo: list[Any] = [kind.status for kind in api.KINDS]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.add(t)
                names |= {info.alias or name for name, info in t.model_fields.items()}
                todo += [info.annotation for info in t.model_fields.values()]
        else:
            todo += get_args(t)
    return {n for n in names if n != n.lower()}


def test_no_status_field_is_read_or_written_by_its_wire_name() -> None:
    """Outside api/, a status field is reached through its model: `"rowsDone"` in code is a second spelling."""
    package = CONTROLLERS.parent
    names = status_wire_names()
    assert {"rowsDone", "observedGeneration", "systemIdentifier"} <= names
    found = [
        f"{path.relative_to(package)}:{node.lineno}: {node.value!r}"
        for path in sorted(package.rglob("*.py"))
        if "api" not in path.relative_to(package).parts
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and node.value in names
    ]
    assert not found, found
