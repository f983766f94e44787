"""Every spec field of every kind is documented on its page (docs/<kind>.md names it in backticks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pgscale.api.crdgen import all_crds

ROOT = Path(__file__).resolve().parents[2]


def field_paths(schema: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        out.append(path)
        if sub.get("type") == "object":
            out += field_paths(sub, path)
        elif sub.get("type") == "array" and "items" in sub:
            out += field_paths(sub["items"], path + "[]")
    return out


def crd_docs() -> list[tuple[str, dict[str, Any]]]:
    import yaml

    docs = [yaml.safe_load(text) for text in all_crds().values()]
    return [(d["spec"]["names"]["kind"], d) for d in docs]


@pytest.mark.parametrize(("kind", "crd"), crd_docs(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_spec_field_is_on_the_kinds_page(kind: str, crd: dict[str, Any]) -> None:
    page = (ROOT / "docs" / f"{kind.lower()}.md").read_text()
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [p for p in field_paths(spec) if f"`{p}`" not in page and f"`{p.replace('[]', '[*]')}`" not in page]
    assert not missing, f"docs/{kind.lower()}.md does not name: {', '.join(missing)}"
