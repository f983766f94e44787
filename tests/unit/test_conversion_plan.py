"""The pure half of a conversion: what blocks it (with the fix), which partitions it starts with."""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime
from typing import Any

import pytest

from pgscale.api.partitionpolicy import PartitionPolicySpec
from pgscale.controllers.partitionpolicy import conversion_fields
from pgscale.conversion import MAX_PARTITIONS, Report, blockers, starting_ranges
from pgscale.errors import SpecError
from pgscale.pg.conversion import ForeignKey, Index, Shape, old_name, shadow_name


def spec(**conversion: Any) -> PartitionPolicySpec:
    return PartitionPolicySpec.model_validate(
        {
            "profileRef": {"name": "app"},
            "table": {"name": "Task"},
            "column": "createdAt",
            "interval": "monthly",
            "premake": 2,
            "conversion": conversion,
        }
    )


def shape(**changes: Any) -> Shape:
    base: dict[str, Any] = dict(
        oid=1,
        owner="app",
        columns=["id", "createdAt"],
        types={"id": "bigint", "createdAt": "timestamp with time zone"},
        generated=set(),
        identity={"id"},
        primary_key=["id"],
        indexes=[
            Index(2, "Task_pkey", "", True, ["id"], "Task_pkey", "p", None, "PRIMARY KEY (id)", "id"),
            Index(3, "Task_status_idx", "", False, ["status"], None, None, "btree (status)"),
        ],
        checks=[],
        outgoing=[],
        incoming=[],
        views=[],
        triggers=[],
        rls=False,
        publications=[],
        inheritance=False,
        comment=None,
        owned_sequences=[],
        not_null={"id", "createdAt"},
    )
    base.update(changes)
    return Shape(**base)


def test_a_plain_table_with_the_column_in_its_key_has_no_blockers() -> None:
    key = Index(
        2,
        "Task_pkey",
        "",
        True,
        ["id", "createdAt"],
        "Task_pkey",
        "p",
        None,
        'PRIMARY KEY (id, "createdAt")',
        'id, "createdAt"',
    )
    assert blockers(shape(indexes=[key]), spec()) == []


def test_key_without_the_partition_column_names_the_constraint_and_the_fix() -> None:
    [problem] = blockers(shape(), spec())
    assert "primary key 'Task_pkey' (id) lacks the partition column 'createdAt'" in problem
    assert "spec.conversion.widenKeys: true" in problem and "(id, createdAt)" in problem
    assert blockers(shape(), spec(widenKeys=True)) == []


def test_keys_with_options_are_widened_only_when_plain() -> None:
    plain = Index(2, "k", "", True, ["id"], "k", "u", None, "UNIQUE (id)", "id")
    assert plain.widened("createdAt") == 'UNIQUE (id, "createdAt")'
    assert Index(2, "k", "", True, ["id"], "k", "u", None, "UNIQUE (id) INCLUDE (x)", "id").widened("c") is None
    deferrable = Index(
        2,
        "k",
        "",
        True,
        ["id", "createdAt"],
        "k",
        "p",
        None,
        'PRIMARY KEY (id, "createdAt") DEFERRABLE',
        'id, "createdAt"',
    )
    assert any("DEFERRABLE" in p for p in blockers(shape(indexes=[deferrable]), spec()))


def test_every_blocker_is_listed_at_once() -> None:
    incoming = [ForeignKey(9, "Message_taskId_fkey", 'public."Message"', "public", "Message", "")]
    problems = blockers(
        shape(
            primary_key=[],
            indexes=[
                Index(4, "Task_title_key", "", True, ["title"], None, None, "btree (title)"),
                Index(5, "odd", "CREATE INDEX odd ...", False, ["x"], None, None, None),
                Index(6, "Task_excl", "", False, ["x"], "Task_excl", "x", None),
            ],
            incoming=incoming,
            views=['public."OpenTasks"'],
            triggers=["audit"],
            rls=True,
            publications=["pub"],
            inheritance=True,
        ),
        spec(widenKeys=True),
    )
    text = " | ".join(problems)
    for expected in (
        "no primary key",
        "unique index 'Task_title_key'",
        "cannot rebuild",
        "exclusion constraint",
        "Message_taskId_fkey",
        "dropReferencingForeignKeys",
        "OpenTasks",
        "audit",
        "row-level security",
        "publications (pub)",
        "inheritance",
    ):
        assert expected in text, expected
    assert len(problems) == 10


def test_what_the_copy_could_not_take_is_refused() -> None:
    nullable = blockers(shape(not_null={"id"}), spec(widenKeys=True))
    assert len(nullable) == 1 and 'ALTER COLUMN "createdAt" SET NOT NULL first' in nullable[0]
    assert "NOT VALID" in blockers(shape(not_valid=["Task_check"]), spec(widenKeys=True))[0]
    assert "generated" in blockers(shape(generated={"createdAt"}), spec(widenKeys=True))[0]


def test_dropping_referencing_keys_is_an_explicit_choice() -> None:
    incoming = [ForeignKey(9, "Message_taskId_fkey", 'public."Message"', "public", "Message", "")]
    assert blockers(shape(incoming=incoming), spec(widenKeys=True))
    assert blockers(shape(incoming=incoming), spec(widenKeys=True, dropReferencingForeignKeys=True)) == []


def test_starting_ranges_cover_the_data_and_premake() -> None:
    now = datetime(2026, 11, 27, tzinfo=UTC)
    ranges = starting_ranges(spec(), "Task", date(2025, 1, 15), date(2026, 11, 27), now)
    assert ranges[0].name == "Task_2025_01" and ranges[0].start == date(2025, 1, 1)
    assert ranges[-1].name == "Task_2027_01"  # November, then two ahead
    assert len(ranges) == 25 and all(a.end == b.start for a, b in itertools.pairwise(ranges))
    # Rows dated past premake get partitions too; an empty table starts at the current month.
    assert starting_ranges(spec(), "Task", None, date(2027, 6, 1), now)[-1].name == "Task_2027_06"
    assert starting_ranges(spec(), "Task", None, None, now)[0].name == "Task_2026_11"


def test_too_many_partitions_asks_for_a_coarser_interval() -> None:
    daily = spec().model_copy(update={"interval": "daily"})
    with pytest.raises(SpecError) as err:
        starting_ranges(daily, "Task", date(2020, 1, 1), date(2026, 11, 27), datetime(2026, 11, 27, tzinfo=UTC))
    assert err.value.field == "interval" and str(MAX_PARTITIONS) in err.value.message


def test_helper_names_fit_postgres_identifiers() -> None:
    long = "T" * 63
    assert len(shadow_name(long).encode()) <= 63 and len(old_name(long).encode()) <= 63
    assert shadow_name("Task") == "Task_pgscale_new" and old_name("Task") == "Task_pgscale_old"


def test_status_fields_carry_counts_rate_eta_and_lock() -> None:
    started = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
    fields = conversion_fields(
        Report(
            phase="prepared",
            rows_total=1000,
            rows_copied=250,
            rows_per_second=50.0,
            eta_seconds=15,
            longest_lock_ms=4,
            started_at=started,
        )
    )
    assert fields.wire() == {
        "step": "prepared",
        "rowsTotal": 1000,
        "rowsDone": 250,
        "rowsPerSecond": 50.0,
        "etaSeconds": 15,
        "startedAt": "2026-11-27T12:00:00Z",
        "longestLockMs": 4,
    }
