from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from pgscale.partitioning import add_periods, keep_from, partition_name, period_start, range_for, wanted


def test_monthly_names_like_the_strategy() -> None:
    ranges = wanted("monthly", "UTC", datetime(2025, 1, 15, tzinfo=UTC), 2, None, "Task")
    assert [(r.name, r.start, r.end) for r in ranges] == [
        ("Task_2025_01", date(2025, 1, 1), date(2025, 2, 1)),
        ("Task_2025_02", date(2025, 2, 1), date(2025, 3, 1)),
        ("Task_2025_03", date(2025, 3, 1), date(2025, 4, 1)),
    ]


def test_time_zone_decides_the_current_partition() -> None:
    late = datetime(2025, 1, 31, 23, 30, tzinfo=UTC)
    assert wanted("monthly", "UTC", late, 0, None, "T")[0].name == "T_2025_01"
    assert wanted("monthly", "Europe/Berlin", late, 0, None, "T")[0].name == "T_2025_02"


@pytest.mark.parametrize(
    ("interval", "day", "start", "name"),
    [
        ("daily", date(2025, 3, 9), date(2025, 3, 9), "T_2025_03_09"),
        ("weekly", date(2025, 1, 1), date(2024, 12, 30), "T_2025_w01"),
        ("quarterly", date(2025, 8, 20), date(2025, 7, 1), "T_2025_q3"),
        ("yearly", date(2025, 8, 20), date(2025, 1, 1), "T_2025"),
    ],
)
def test_period_starts_and_names(interval: str, day: date, start: date, name: str) -> None:
    assert period_start(interval, day) == start
    assert range_for(interval, day, None, "T").name == name


def test_month_arithmetic_crosses_years() -> None:
    assert add_periods("monthly", date(2025, 11, 1), 3) == date(2026, 2, 1)
    assert add_periods("quarterly", date(2025, 10, 1), 1) == date(2026, 1, 1)


def test_keep_window_never_reaches_the_current_partition() -> None:
    now = datetime(2025, 6, 15, tzinfo=UTC)
    assert keep_from("12 months", "UTC", now, "monthly") == date(2024, 6, 1)
    assert keep_from("90d", "UTC", now, "monthly") == date(2025, 3, 3)
    assert keep_from("1d", "UTC", now, "monthly") <= date(2025, 6, 1)


def test_long_names_are_refused() -> None:
    with pytest.raises(ValueError, match="longer than 63 bytes"):
        partition_name("{table}_{YYYY}_{MM}", "monthly", "x" * 60, date(2025, 1, 1))
