"""Generate CustomResourceDefinitions from the pydantic models.

pydantic's JSON Schema is close to, but not, a Kubernetes *structural* schema:
it uses ``$ref``/``$defs``, ``anyOf [X, null]`` for optional fields, titles, and
``additionalProperties: false``. :func:`structural` rewrites it: references are
inlined, optional fields become plain fields, enums get their type, and every
node keeps the description that ``kubectl explain`` prints. The result is
checked by :func:`check_structural` so a model change that the API server would
refuse fails in a unit test, not at install time.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from . import GROUP, KINDS, VERSION, Kind

_DROP_KEYS = {"title", "discriminator"}
_ALLOWED_FORMATS = {"date-time", "date", "byte", "int32", "int64", "float", "double", "password"}
CATEGORY = "pgscale"


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Resolve $ref against defs; a field's own keys (description, rules) win over the def's."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    if "allOf" in node and len(node["allOf"]) == 1:
        node = {**node.pop("allOf")[0], **node}
    if "$ref" in node:
        target = copy.deepcopy(defs[node.pop("$ref").split("/")[-1]])
        merged = {**target, **node}
        rules = target.get("x-kubernetes-validations", []) + node.get("x-kubernetes-validations", [])
        if rules:
            merged["x-kubernetes-validations"] = rules
        node = merged
    return {k: _inline(v, defs) for k, v in node.items()}


def _simplify(node: Any) -> Any:
    """Turn pydantic's JSON Schema idioms into structural-schema ones, bottom-up."""
    if isinstance(node, list):
        return [_simplify(n) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _simplify(v) for k, v in node.items() if k not in _DROP_KEYS}
    if "anyOf" in node:
        branches = [b for b in node["anyOf"] if b.get("type") != "null"]
        if node.get("x-kubernetes-int-or-string"):
            pass
        elif len(branches) == 1:
            del node["anyOf"]
            outer = node
            node = {**branches[0], **outer}
            if "x-kubernetes-validations" in branches[0] and "x-kubernetes-validations" in outer:
                node["x-kubernetes-validations"] = (
                    branches[0]["x-kubernetes-validations"] + outer["x-kubernetes-validations"]
                )
        elif {b.get("type") for b in branches} == {"integer", "string"}:
            node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            node["x-kubernetes-int-or-string"] = True
        else:
            raise ValueError(f"unsupported union in schema: {node}")
    if node.get("default", 0) is None:
        del node["default"]
    if "enum" in node and "type" not in node:
        node["type"] = "string"
    if "const" in node:
        node["enum"] = [node.pop("const")]
        node.setdefault("type", "string")
    if node.get("format") and node["format"] not in _ALLOWED_FORMATS:
        del node["format"]
    if node.get("type") == "object":
        if node.get("additionalProperties") is False:
            del node["additionalProperties"]
        if "properties" in node and not node["properties"]:
            del node["properties"]
        if "properties" not in node and "additionalProperties" not in node:
            node["x-kubernetes-preserve-unknown-fields"] = True
    for bound, limit in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[limit] = node[bound]  # JSON Schema 2020 -> OpenAPI v3.0's boolean form
            node[bound] = True
    if node.get("type") == "number" and isinstance(node.get("default"), int):
        node["default"] = float(node["default"])
    # A default for an empty map or list is noise in `kubectl get -o yaml`.
    if node.get("default") in ({}, []):
        del node["default"]
    return node


def structural(model: type[BaseModel]) -> dict[str, Any]:
    """The structural OpenAPI v3 schema of a model, with camelCase field names."""
    raw = model.model_json_schema(by_alias=True, mode="serialization")
    defs = raw.pop("$defs", {})
    return dict(_simplify(_inline(raw, defs)))


def check_structural(node: dict[str, Any], path: str = "") -> list[str]:
    """Problems the API server would reject, or that make `kubectl explain` useless."""
    problems: list[str] = []
    if "$ref" in node:
        problems.append(f"{path}: $ref")
    if "type" not in node and not node.get("x-kubernetes-int-or-string"):
        problems.append(f"{path}: no type")
    if "description" not in node and path.count(".") > 1 and not path.endswith(("[]", "{}")):
        problems.append(f"{path}: no description")
    if (
        node.get("type") == "string"
        and node.get("x-kubernetes-validations")
        and not ("maxLength" in node or "enum" in node)
    ):
        problems.append(f"{path}: string with CEL rules needs maxLength")
    if node.get("type") == "array" and "maxItems" not in node and path.startswith(".spec"):
        problems.append(f"{path}: list without maxItems")
    for name, child in node.get("properties", {}).items():
        problems += check_structural(child, f"{path}.{name}")
    if isinstance(node.get("additionalProperties"), dict):
        problems += check_structural(node["additionalProperties"], f"{path}{{}}")
    if isinstance(node.get("items"), dict):
        problems += check_structural(node["items"], f"{path}[]")
    return problems


def crd(kind: Kind) -> dict[str, Any]:
    """The full CustomResourceDefinition of a kind."""
    spec_schema = structural(kind.spec)
    spec_schema["description"] = kind.spec.__doc__.strip().splitlines()[0] if kind.spec.__doc__ else ""
    status_schema = structural(kind.status)
    status_schema["description"] = (kind.status.__doc__ or "").strip().splitlines()[0]
    info = kind.info
    schema = {
        "type": "object",
        "description": f"{info.kind} of pgscale: see docs/{info.singular}.md.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "APIVersion of the object."},
            "kind": {"type": "string", "description": "Kind of the object."},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{info.plural}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "pgscale", "app.kubernetes.io/part-of": "pgscale"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": info.kind,
                "listKind": f"{info.kind}List",
                "plural": info.plural,
                "singular": info.singular,
                "shortNames": list(info.short_names),
                "categories": [CATEGORY],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [c.wire() for c in info.columns],
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def render(kind: Kind) -> str:
    """A CRD as YAML text, stable across runs (the file in crds/)."""
    header = "# Generated by `pgscale crds --write crds/` from operator/pgscale/api; do not edit.\n"
    return header + yaml.safe_dump(crd(kind), sort_keys=False, width=100, allow_unicode=True)


def filename(kind: Kind) -> str:
    """The file a kind's CRD is written to."""
    return f"{GROUP}_{kind.plural}.yaml"


def all_crds() -> dict[str, str]:
    """File name to YAML text, for every kind."""
    return {filename(k): render(k) for k in KINDS}
