from __future__ import annotations

import re

import pytest

from pgscale.api.common import AGE_PATTERN, DURATION_PATTERN
from pgscale.durations import Age, seconds


@pytest.mark.parametrize(("text", "expected"), [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("2d", 172800)])
def test_seconds(text: str, expected: float) -> None:
    assert re.match(DURATION_PATTERN, text)
    assert seconds(text) == expected


@pytest.mark.parametrize(
    ("text", "interval"),
    [("90d", "90 days"), ("12 months", "12 months"), ("12mo", "12 months"), ("1y", "1 years"), ("2 weeks", "2 weeks")],
)
def test_age_interval(text: str, interval: str) -> None:
    assert re.match(AGE_PATTERN, text)
    assert Age.parse(text).interval() == interval


@pytest.mark.parametrize("text", ["90", "1.5d", "-1d", "90 dayz", "1 month; DROP TABLE x"])
def test_bad_ages_rejected_by_pattern_and_parser(text: str) -> None:
    assert not re.match(AGE_PATTERN, text)
    with pytest.raises(ValueError):
        Age.parse(text)
