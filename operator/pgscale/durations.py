"""Parsing of the API's duration and age strings (see the patterns in api.common)."""

from __future__ import annotations

import re
from dataclasses import dataclass

_FIXED = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^([0-9]{1,9})(ms|s|m|h|d|w)$")
_AGE = re.compile(r"^([1-9][0-9]{0,4}) ?(d|w|mo|y|days?|weeks?|months?|years?)$")
_AGE_UNITS = {
    "d": "days", "day": "days", "days": "days",
    "w": "weeks", "week": "weeks", "weeks": "weeks",
    "mo": "months", "month": "months", "months": "months",
    "y": "years", "year": "years", "years": "years",
}  # fmt: skip


def seconds(value: str) -> float:
    """A fixed-length duration (500ms, 30s, 5m, 1h, 2d, 1w) in seconds."""
    match = _DURATION.match(value)
    if not match:
        raise ValueError(f"invalid duration {value!r}: use e.g. 500ms, 30s, 5m, 1h, 2d")
    return int(match.group(1)) * _FIXED[match.group(2)]


@dataclass(frozen=True)
class Age:
    """A calendar age such as 90 days or 12 months; months and years follow the calendar."""

    count: int
    unit: str  # days | weeks | months | years

    @classmethod
    def parse(cls, value: str) -> Age:
        match = _AGE.match(value.strip())
        if not match:
            raise ValueError(f"invalid age {value!r}: use e.g. 90d, 12mo, 1y or '90 days'")
        return cls(int(match.group(1)), _AGE_UNITS[match.group(2)])

    def interval(self) -> str:
        """The age as Postgres interval text, passed as a bound parameter (never spliced)."""
        return f"{self.count} {self.unit}"

    def approx_days(self) -> float:
        """Rough length in days, for display and estimates only."""
        return self.count * {"days": 1, "weeks": 7, "months": 30.44, "years": 365.25}[self.unit]
