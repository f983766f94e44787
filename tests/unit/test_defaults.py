"""A sub-spec's defaults live in its model only: no call site restates one.

An optional sub-spec (``spec.conversion``, ``spec.monitoring``...) is read through the
spec's ``*_or_default`` property; code that writes ``conv.batch_size if conv else 10000``
(or ``bool(conv and conv.widen_keys)``, ``raw.get("poolMode", "transaction")``) keeps a
second copy of a default that silently goes stale when the model's changes.
"""

from __future__ import annotations

import ast
import contextlib
from collections import defaultdict
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel

from pgscale import api
from pgscale.api import partitionpolicy
from pgscale.api.databaseprofile import AlertsSpec, CapacitySpec, DatabaseProfileSpec, MonitoringSpec
from pgscale.api.partitionpolicy import ConversionSpec, MaintenanceSpec, PartitionPolicySpec
from pgscale.durations import seconds

PACKAGE = Path(api.__file__).resolve().parents[1]


def spec_models() -> list[type[BaseModel]]:
    """Every kind's spec model and the sub-spec models reachable from it."""
    seen: list[type[BaseModel]] = []
    todo: list[Any] = [kind.spec for kind in api.KINDS]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.append(t)
                todo += [info.annotation for info in t.model_fields.values()]
        else:
            todo += get_args(t)
    return seen


def field_defaults() -> dict[str, set[Any]]:
    """Every spec field's default, by Python name and by wire name (None left out); durations also in s and ms."""
    out: dict[str, set[Any]] = defaultdict(set)
    for model in spec_models():
        for name, info in model.model_fields.items():
            default = info.default
            if default is None or not isinstance(default, (bool, int, float, str)):
                continue
            values: set[Any] = {default}
            if isinstance(default, str):
                with contextlib.suppress(ValueError):
                    values |= {seconds(default), seconds(default) * 1000}
            out[name].update(values)
            out[info.alias or name].update(values)
    return out


DEFAULTS = field_defaults()


def constant(node: ast.expr) -> tuple[bool, Any]:
    return (True, node.value) if isinstance(node, ast.Constant) and node.value is not None else (False, None)


def is_default(field: str, value: Any) -> bool:
    """Whether `value` is a default some spec field named `field` declares (3600.0 counts for "1h")."""
    return any(value == d and (type(value) is type(d) or isinstance(value, float)) for d in DEFAULTS.get(field, ()))


def same(a: ast.AST, b: ast.AST) -> bool:
    return ast.dump(a) == ast.dump(b)


def restated(tree: ast.AST) -> list[tuple[int, str]]:
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        hit = False
        if isinstance(node, ast.IfExp):
            # `a.f if a else <default of f>`, also inside a call: `seconds(a.f) if a else 3600.0`
            ok, value = constant(node.orelse)
            hit = ok and any(
                isinstance(sub, ast.Attribute) and same(sub.value, node.test) and is_default(sub.attr, value)
                for sub in ast.walk(node.body)
            )
        elif isinstance(node, ast.BoolOp) and len(node.values) == 2 and isinstance(node.values[1], ast.Attribute):
            # `a and a.f` (f defaults to False), `a is None or a.f` (f defaults to True)
            first, second = node.values[0], node.values[1]
            assert isinstance(second, ast.Attribute)
            hit = (isinstance(node.op, ast.And) and same(first, second.value) and is_default(second.attr, False)) or (
                isinstance(node.op, ast.Or)
                and isinstance(first, ast.Compare)
                and isinstance(first.ops[0], ast.Is)
                and same(first.left, second.value)
                and is_default(second.attr, True)
            )
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and len(node.args) == 2
            and isinstance(node.args[0], ast.Constant)
            and isinstance(key := node.args[0].value, str)
        ):
            # `raw.get("poolMode", "transaction")`, `table.get("schema", "public")` on a spec read as a dict
            ok, value = constant(node.args[1])
            hit = ok and is_default(key, value)
        if hit:
            found.append((getattr(node, "lineno", 0), ast.unparse(node)))
    return found


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "api" not in p.relative_to(PACKAGE).parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_restated_sub_spec_default(path: Path) -> None:
    hits = restated(ast.parse(path.read_text()))
    assert not hits, "\n".join(
        f"{path.name}:{line}: {code} (use the spec's *_or_default property)" for line, code in hits
    )


def test_the_scan_finds_what_it_looks_for() -> None:
    source = """
batch = conv.batch_size if conv else 10000
interval = seconds(maintenance.interval) if maintenance else 3600.0
lock = seconds(spec.conversion.lock_timeout if spec.conversion else "1s")
widen = bool(conv and conv.widen_keys)
enabled = spec.conversion is None or spec.conversion.enabled
mode = raw.get("poolMode", "transaction")
schema = table.get("schema", "public")
"""
    assert len(restated(ast.parse(source))) == 7


def test_or_default_properties_return_the_models_defaults() -> None:
    pp = PartitionPolicySpec.model_validate(
        {"profileRef": {"name": "p"}, "table": {"name": "t"}, "column": "c", "interval": "monthly"}
    )
    assert pp.conversion_or_default == ConversionSpec()
    assert pp.maintenance_or_default == MaintenanceSpec()
    assert pp.maintenance_or_default.interval_seconds == seconds(MaintenanceSpec().interval)
    assert pp.conversion_or_default.lock_timeout_ms == seconds(ConversionSpec().lock_timeout) * 1000
    assert pp.retention_action == partitionpolicy.RetentionSpec.model_fields["action"].default
    dp = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "s"}}})
    assert dp.monitoring_or_default == MonitoringSpec()
    assert dp.capacity_or_default == CapacitySpec()
    assert dp.monitoring_or_default.alerts_or_default == AlertsSpec()
