"""The version matrix's pins and selection (hack/postgres-versions.txt, hack/pgmatrix.py): every
pin is well-formed, every test an area names exists, and the table reads pytest's JUnit XML."""

from __future__ import annotations

import ast
import base64
from pathlib import Path

import localenv
import pgmatrix
import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_every_pin_names_a_version_of_its_major_and_a_sha512() -> None:
    pins = localenv.postgres_pins()
    assert set(pins) == {14, 16, 17, 18} and localenv.DEBIAN_MAJOR not in pins
    for major, pin in pins.items():
        assert pin.version.split(".")[0] == str(major)
        assert pin.integrity.startswith("sha512-") and len(base64.b64decode(pin.integrity[7:])) == 64
        assert pin.key.startswith(pin.version + "-") and len(pin.key) == len(pin.version) + 17
    assert localenv.postgres_majors() == [14, 15, 16, 17, 18]


def test_the_version_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PGSCALE_PG_VERSION", raising=False)
    assert localenv.selected_major() == 15
    monkeypatch.setenv("PGSCALE_PG_VERSION", "17")
    assert localenv.selected_major() == 17
    monkeypatch.setenv("PGSCALE_PG_VERSION", "13")
    with pytest.raises(ValueError, match="expected one of 14, 15, 16, 17, 18"):
        localenv.selected_major()


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")}


def test_every_test_an_area_names_exists() -> None:
    """A renamed test would otherwise drop out of the matrix with a pytest error only in CI."""
    for test in [t for tests in pgmatrix.AREAS.values() for t in tests] + pgmatrix.SLOW_AND_VERSION_BLIND:
        file, _, name = test.partition("::")
        assert (ROOT / file).is_file(), test
        assert not name or name in _tests_in(ROOT / file), test


def test_selection_and_areas() -> None:
    core = pgmatrix.selection(16)
    assert "tests/integration" not in core and "tests/e2e/test_retention.py" in core
    assert (
        "--deselect=tests/integration/test_file_migration.py::test_killed_at_random_points_and_rerun_until_done" in core
    )
    full = pgmatrix.selection(17)
    assert full[0] == "tests/integration" and not any(a.startswith("--deselect=tests/integration") for a in full)
    assert pgmatrix.area_of("tests/integration/test_retention_job.py::test_x[archive]") == "retention"
    assert pgmatrix.area_of("tests/e2e/test_databaseprofile_e2e.py::test_metrics_show_the_database") == "metrics"
    assert (
        pgmatrix.area_of("tests/e2e/test_databaseprofile_e2e.py::test_pooler_objects_and_their_config_serve_clients")
        == "other"
    )


def test_table_from_junit(tmp_path: Path) -> None:
    (tmp_path / "pg16.xml").write_text(
        """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
        <testcase classname="tests.integration.test_stats_snapshot" name="test_a" time="1"/>
        <testcase classname="tests.e2e.test_retention" name="test_b" time="1"><skipped message="x"/></testcase>
        <testcase classname="tests.e2e.test_retention" name="test_c" time="1"/>
        <testcase classname="tests.integration.test_file_migration" name="test_d"><failure message="x"/></testcase>
        <testcase classname="tests.unit.test_models" name="test_e" time="1"/>
        </testsuite></testsuites>"""
    )
    text, failed = pgmatrix.table(tmp_path)
    assert failed == 1
    cells = {line.split(" | ")[0].strip("| "): line.rstrip(" |").split(" | ")[2:] for line in text.splitlines()[2:]}
    assert set(cells) == {"14", "15", "16", "17", "18"} and cells["14"] == ["not run"] * 6
    settings, metrics, conversion, retention, files, other = cells["16"]
    assert (settings, metrics, conversion, other) == ("not run", "passed (1)", "not run", "not run")  # no unit tests
    assert retention == "passed (1), 1 skipped" and files == "**failed** 1 of 1"
