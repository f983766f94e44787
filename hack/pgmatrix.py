"""The PostgreSQL version matrix: which tests run on which version, and the table of results.

hack/test.sh runs the whole suite on Debian's PostgreSQL 15, then `pgmatrix.py all`: one pytest
run per other version (hack/postgres-versions.txt) with the integration and e2e tests of the
core areas (AREAS), and on FULL_MAJORS every integration test too. Every run writes JUnit XML
into one directory; `pgmatrix.py table DIR` turns them into the version x area table
(`--write` puts it into docs/postgres-versions.md).

    uv run --frozen python hack/pgmatrix.py all .tmp/matrix      # every other version's pass, the table
    uv run --frozen python hack/pgmatrix.py run 14 .tmp/matrix   # one version's pass
    uv run --frozen python hack/pgmatrix.py table .tmp/matrix --write
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import localenv

ROOT = Path(__file__).resolve().parent.parent

# The feature areas of the matrix: the tests that show each works (files, or a file's tests).
AREAS: dict[str, list[str]] = {
    "settings": [
        "tests/integration/test_settings_and_slots.py",
        "tests/e2e/test_databaseprofile_e2e.py::test_strategy_settings_applied_kept_and_reported",
        "tests/e2e/test_databaseprofile_e2e.py::test_two_profiles_on_one_server_have_one_settings_owner",
    ],
    "metrics": [
        "tests/integration/test_stats_snapshot.py",
        "tests/e2e/test_databaseprofile_e2e.py::test_metrics_show_the_database",
        "tests/e2e/test_status_cli.py",
    ],
    "conversion": [
        "tests/integration/test_partition_conversion.py",
        "tests/integration/test_partition_maintenance.py",
        "tests/e2e/test_partition_conversion_e2e.py",
        "tests/e2e/test_partitionpolicy_e2e.py",
    ],
    "retention": [
        "tests/integration/test_retention_batches.py",
        "tests/integration/test_retention_children.py",
        "tests/integration/test_retention_job.py",
        "tests/integration/test_retention_partitions.py",
        "tests/integration/test_retention_relationship_edges.py",
        "tests/e2e/test_retention.py",
    ],
    "file migration": [
        "tests/integration/test_file_migration.py",
        "tests/e2e/test_filemigration_e2e.py",
    ],
}
OTHER = "other"
# Left out of the core passes: long, and what they add (kills at random points, a CLI's
# kubeconfig handling) does not depend on the server's version. They run on 15.
SLOW_AND_VERSION_BLIND = [
    "tests/integration/test_file_migration.py::test_killed_at_random_points_and_rerun_until_done",
    "tests/e2e/test_status_cli.py::test_kubectl_plugin_and_context_namespace",
]
FULL_MAJORS = (17,)  # the whole integration tier besides the core areas' e2e tests
INTEGRATION = "tests/integration"


def selection(major: int) -> list[str]:
    """The pytest arguments that select a version's pass: the core areas (on FULL_MAJORS, with
    every integration test)."""
    tests = [test for tests in AREAS.values() for test in tests]
    if major in FULL_MAJORS:
        tests = [INTEGRATION, *(t for t in tests if not t.startswith(INTEGRATION + "/"))]
    deselect = [t for t in SLOW_AND_VERSION_BLIND if major not in FULL_MAJORS or not t.startswith(INTEGRATION)]
    return [*tests, *(f"--deselect={t}" for t in deselect)]


def area_of(nodeid: str) -> str:
    """The area a test (path::name[params]) belongs to."""
    path, _, name = nodeid.partition("::")
    for area, tests in AREAS.items():
        for test in tests:
            file, _, only = test.partition("::")
            if path == file and (not only or name.split("[")[0] == only):
                return area
    return OTHER


def junit_path(outdir: Path, major: int) -> Path:
    return outdir / f"pg{major}.xml"


def run(major: int, outdir: Path, extra: list[str]) -> int:
    """One version's pass: pytest on its selection with --pg-version, JUnit XML into outdir."""
    outdir.mkdir(parents=True, exist_ok=True)
    localenv.postgres_bin(major)  # fetched and unpacked now (cold: seconds), not inside a fixture
    what = f"core areas ({', '.join(AREAS)})" + (", every integration test" if major in FULL_MAJORS else "")
    print(f"== pytest on PostgreSQL {major}: {what}", file=sys.stderr, flush=True)
    started = time.monotonic()
    code = subprocess.call(
        [
            sys.executable,
            "-m",
            "pytest",
            *selection(major),
            f"--pg-version={major}",
            f"--junitxml={junit_path(outdir, major)}",
            *extra,
        ],
        cwd=ROOT,
    )
    print(f"== PostgreSQL {major}: {(time.monotonic() - started) / 60:.1f} min", file=sys.stderr, flush=True)
    return code


def outcomes(xml: Path) -> list[tuple[str, str]]:
    """(path::name, passed|failed|skipped) of every test in a JUnit XML file."""
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):  # noqa: S314 - pytest wrote it in this run
        parts = case.get("classname", "").split(".")  # tests.e2e.test_x (.TestClass)
        path = next(
            (
                "/".join(parts[:n]) + ".py"
                for n in range(len(parts), 0, -1)
                if (ROOT / "/".join(parts[:n])).with_suffix(".py").exists()
            ),
            "/".join(parts) + ".py",
        )
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
            elif child.tag == "skipped" and outcome == "passed":
                outcome = "skipped"
        out.append((f"{path}::{case.get('name', '')}", outcome))
    return out


def results(xml: Path) -> dict[str, dict[str, int]]:
    """area -> outcome -> count of the tests that touch PostgreSQL (the integration and e2e tiers)."""
    out: dict[str, dict[str, int]] = {}
    for nodeid, outcome in outcomes(xml):
        if nodeid.startswith(("tests/integration/", "tests/e2e/")):
            counts = out.setdefault(area_of(nodeid), {})
            counts[outcome] = counts.get(outcome, 0) + 1
    return out


def cell(counts: dict[str, int] | None) -> str:
    if not counts:
        return "not run"
    failed, passed, skipped = counts.get("failed", 0), counts.get("passed", 0), counts.get("skipped", 0)
    total = failed + passed
    text = f"**failed** {failed} of {total}" if failed else (f"passed ({passed})" if passed else "")
    if skipped:
        text += f"{', ' if text else ''}{skipped} skipped"
    return text


def table(outdir: Path) -> tuple[str, int]:
    """The markdown table of every version's results in outdir, and how many tests failed."""
    areas = [*AREAS, OTHER]
    lines = [
        "| PostgreSQL | server | " + " | ".join(areas) + " |",
        "| --- | --- | " + " | ".join("---" for _ in areas) + " |",
    ]
    pins = localenv.postgres_pins()
    failed = 0
    for major in localenv.postgres_majors():
        xml = junit_path(outdir, major)
        found = results(xml) if xml.exists() else {}
        failed += sum(c.get("failed", 0) for c in found.values())
        server = "Debian" if major == localenv.DEBIAN_MAJOR else f"`{pins[major].version}`"
        lines.append(f"| {major} | {server} | " + " | ".join(cell(found.get(a)) for a in areas) + " |")
    return "\n".join(lines) + "\n", failed


BEGIN, END = "<!-- matrix:begin -->", "<!-- matrix:end -->"
DOC = ROOT / "docs" / "postgres-versions.md"


def write_doc(text: str) -> None:
    """Replace the table between the markers in docs/postgres-versions.md."""
    doc = DOC.read_text()
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}{END}{tail}")


def run_all(outdir: Path, extra: list[str]) -> int:
    """Every pinned version's pass, the table, and one closing line over every JUnit file in outdir."""
    code = 0
    for major in sorted(localenv.postgres_pins(), key=lambda m: (m not in FULL_MAJORS, m)):
        code = run(major, outdir, extra) or code
    text, _ = table(outdir)
    print("== PostgreSQL versions x areas (docs/postgres-versions.md)\n" + text, end="", flush=True)
    totals = {"passed": 0, "failed": 0, "skipped": 0}
    for xml in sorted(outdir.glob("pg*.xml")):
        for _, outcome in outcomes(xml):
            totals[outcome] += 1
    print(f"versions: {totals['passed']} passed, {totals['failed']} failed, {totals['skipped']} skipped", flush=True)
    return code


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="one version's pass (pytest arguments may follow --)")
    r.add_argument("major", type=int)
    r.add_argument("outdir", type=Path)
    r.add_argument("pytest_args", nargs="*")
    a = sub.add_parser("all", help="every pinned version's pass, then the table (what hack/test.sh runs)")
    a.add_argument("outdir", type=Path)
    a.add_argument("pytest_args", nargs="*")
    t = sub.add_parser("table", help="the version x area table from the JUnit files in outdir")
    t.add_argument("outdir", type=Path)
    t.add_argument("--write", action="store_true", help=f"also write it into {DOC.relative_to(ROOT)}")
    args = p.parse_args()
    if args.command == "run":
        return run(args.major, args.outdir, args.pytest_args)
    if args.command == "all":
        return run_all(args.outdir, args.pytest_args)
    text, failed = table(args.outdir)
    print(text, end="")
    if args.write:
        write_doc(text)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
