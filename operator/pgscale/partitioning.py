"""Partition ranges of a PartitionPolicy (pure): which partitions should exist, and which are expired.

Boundaries fall at midnight in the policy's time zone: days, ISO weeks (Monday),
months, quarters, years. Names come from the naming pattern's tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from .api.partitionpolicy import DEFAULT_NAMING
from .durations import Age


@dataclass(frozen=True)
class Range:
    """One partition's bounds [start, end) as local dates, and its name."""

    name: str
    start: date
    end: date


def period_start(interval: str, day: date) -> date:
    """The first day of the period containing `day`."""
    if interval == "daily":
        return day
    if interval == "weekly":
        return day - timedelta(days=day.weekday())
    if interval == "monthly":
        return day.replace(day=1)
    if interval == "quarterly":
        return date(day.year, 3 * ((day.month - 1) // 3) + 1, 1)
    if interval == "yearly":
        return date(day.year, 1, 1)
    raise ValueError(f"unknown interval {interval!r}")


def add_periods(interval: str, start: date, n: int) -> date:
    """`start` moved by n periods (start must be a period start)."""
    if interval == "daily":
        return start + timedelta(days=n)
    if interval == "weekly":
        return start + timedelta(weeks=n)
    months = {"monthly": 1, "quarterly": 3, "yearly": 12}[interval] * n
    total = start.year * 12 + start.month - 1 + months
    return date(total // 12, total % 12 + 1, 1)


def partition_name(pattern: str | None, interval: str, table: str, start: date) -> str:
    """Render the naming pattern; names longer than 63 bytes are an error the spec must fix."""
    iso_year, iso_week, _ = start.isocalendar()
    name = (
        (pattern or DEFAULT_NAMING[interval])
        .replace("{table}", table)
        .replace("{YYYY}", f"{start.year:04d}")
        .replace("{MM}", f"{start.month:02d}")
        .replace("{DD}", f"{start.day:02d}")
        .replace("{Q}", str((start.month - 1) // 3 + 1))
        .replace("{IYYY}", f"{iso_year:04d}")
        .replace("{IW}", f"{iso_week:02d}")
    )
    if len(name.encode()) > 63:
        raise ValueError(f"partition name {name!r} is longer than 63 bytes; shorten namingPattern")
    return name


def wanted(interval: str, time_zone: str, now: datetime, premake: int, pattern: str | None, table: str) -> list[Range]:
    """The current partition and `premake` future ones, whether or not rows arrive."""
    today = now.astimezone(ZoneInfo(time_zone)).date()
    first = period_start(interval, today)
    out = []
    for i in range(premake + 1):
        start = add_periods(interval, first, i)
        end = add_periods(interval, first, i + 1)
        out.append(Range(partition_name(pattern, interval, table, start), start, end))
    return out


def range_for(interval: str, value: date, pattern: str | None, table: str) -> Range:
    """The partition a day belongs to (for rows found in the DEFAULT partition)."""
    start = period_start(interval, value)
    return Range(partition_name(pattern, interval, table, start), start, add_periods(interval, start, 1))


def keep_from(keep: str, time_zone: str, now: datetime, interval: str) -> date:
    """Partitions ending on or before this day are past the keep window.

    The window is counted back from the start of the current partition, so the current
    and future partitions are never expired, whatever `keep` says.
    """
    age = Age.parse(keep)
    today = now.astimezone(ZoneInfo(time_zone)).date()
    current = period_start(interval, today)
    if age.unit in ("months", "years"):
        months = age.count * (12 if age.unit == "years" else 1)
        total = current.year * 12 + current.month - 1 - months
        return min(current, date(total // 12, total % 12 + 1, min(current.day, 28)))
    days = age.count * (7 if age.unit == "weeks" else 1)
    return min(current, current - timedelta(days=days))
