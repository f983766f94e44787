"""The CRDs in crds/ are generated from the models, structural, and documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pgscale.api import KINDS, crdgen
from pgscale.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_crds_directory_is_up_to_date() -> None:
    generated = crdgen.all_crds()
    on_disk = {p.name: p.read_text() for p in (ROOT / "crds").glob("*.yaml")}
    assert on_disk == generated, "crds/ is stale: run `pgscale crds --write crds/`"


def test_check_command_reports_stale(tmp_path: Path) -> None:
    assert main(["crds", "--write", str(tmp_path)]) == 0
    assert main(["crds", "--check", str(tmp_path)]) == 0
    (tmp_path / crdgen.filename(KINDS[0])).write_text("stale")
    assert main(["crds", "--check", str(tmp_path)]) == 1


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_schema_is_structural_and_described(kind: object) -> None:
    crd = crdgen.crd(kind)  # type: ignore[arg-type]
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert crdgen.check_structural(schema) == []
    text = yaml.safe_dump(crd)
    assert "$ref" not in text and "title:" not in text


@pytest.mark.parametrize("kind", KINDS, ids=lambda k: k.name)
def test_kind_presentation(kind: object) -> None:
    crd = crdgen.crd(kind)  # type: ignore[arg-type]
    names = crd["spec"]["names"]
    version = crd["spec"]["versions"][0]
    assert names["categories"] == ["pgscale"] and names["shortNames"]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert {"Ready", "Status", "Age"} <= set(columns)
    assert columns["Status"]["priority"] == 1


def test_optional_fields_become_plain_fields() -> None:
    spec = crdgen.structural(KINDS[0].spec)
    tier = spec["properties"]["tier"]
    assert tier["type"] == "string" and tier["enum"] == ["development", "production", "high-load"]
    assert "anyOf" not in tier and "default" not in tier


def test_quantity_is_int_or_string() -> None:
    spec = crdgen.structural(KINDS[0].spec)
    memory = spec["properties"]["resources"]["properties"]["memory"]
    assert memory["x-kubernetes-int-or-string"] is True and "pattern" in memory
    assert memory["description"]


def test_exclusive_bounds_use_openapi_v3_booleans() -> None:
    spec = crdgen.structural(KINDS[0].spec)
    query = spec["properties"]["monitoring"]["properties"]["alerts"]["properties"]["queryTimeSeconds"]
    assert query["exclusiveMinimum"] is True and query["minimum"] == 0
