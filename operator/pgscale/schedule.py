"""Cron schedules and time zones of the API, checked and evaluated (pure)."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterBadDateError

from .errors import SpecError


def zone(name: str, field: str = "timeZone") -> ZoneInfo:
    """An IANA time zone; SpecError names the field."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise SpecError(field, f"unknown time zone {name!r}: use an IANA name like Europe/Berlin or UTC") from exc


def next_run(schedule: str, time_zone: str, now: datetime | None = None, *, field: str = "schedule") -> datetime:
    """When a cron schedule fires next, in UTC; SpecError names the bad field."""
    tz = zone(time_zone)
    if not croniter.is_valid(schedule):
        raise SpecError(field, f"{schedule!r} is not a valid cron expression (minute hour day-of-month month weekday)")
    start = (now or datetime.now(UTC)).astimezone(tz)
    try:
        return croniter(schedule, start).get_next(datetime).astimezone(UTC)  # type: ignore[no-any-return]
    except CroniterBadDateError as exc:  # accepted by the syntax, but no date matches (0 0 31 4 *)
        raise SpecError(
            field,
            f"{schedule!r} never fires: no date matches its day-of-month and month (like April 31 or "
            "February 30); pick a day every chosen month has",
            reason="ScheduleNeverFires",
        ) from exc


def rfc3339(value: datetime | None) -> str | None:
    """A time as Kubernetes writes it."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if value else None
