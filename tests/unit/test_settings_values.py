"""Values are checked and compared in each setting's own unit, as pg_settings describes it."""

from __future__ import annotations

import pytest

from pgscale.pg.settings import Setting, normalize, same

SHARED_BUFFERS = Setting("shared_buffers", "16384", "8kB", "integer", "16", "1073741823", (), "postmaster", False)
WORK_MEM = Setting("work_mem", "4096", "kB", "integer", "64", "2147483647", (), "user", False)
CHECKPOINT_TIMEOUT = Setting("checkpoint_timeout", "300", "s", "integer", "30", "86400", (), "sighup", False)
RANDOM_PAGE_COST = Setting("random_page_cost", "4", None, "real", "0", "1.79769e+308", (), "user", False)
WAL_LEVEL = Setting(
    "wal_level", "replica", None, "enum", None, None, ("minimal", "replica", "logical"), "postmaster", False
)
FSYNC = Setting("fsync", "on", None, "bool", None, None, (), "sighup", False)


def test_memory_units_compare_in_the_settings_unit() -> None:
    assert normalize(SHARED_BUFFERS, "256MB") == 32768
    assert same(SHARED_BUFFERS, "32768", "256MB") and same(SHARED_BUFFERS, "0.25GB", "256MB")
    assert normalize(WORK_MEM, "4MB") == 4096 and same(WORK_MEM, "4096", "4MB")


def test_time_units() -> None:
    assert normalize(CHECKPOINT_TIMEOUT, "5min") == 300 and normalize(CHECKPOINT_TIMEOUT, "300") == 300


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        (WORK_MEM, "4XB", "invalid unit 'XB'; valid units for this setting are B, kB, MB, GB, TB"),
        (WORK_MEM, "32kB", "below the minimum 64kB"),
        (CHECKPOINT_TIMEOUT, "2d", "above the maximum 86400s"),
        (WAL_LEVEL, "archive", "expects one of minimal, replica, logical"),
        (FSYNC, "maybe", "expects on or off"),
        (RANDOM_PAGE_COST, "fast", "expects a number"),
    ],
)
def test_bad_values_say_what_is_wrong(setting: Setting, value: str, error: str) -> None:
    with pytest.raises(ValueError, match=error.replace("(", r"\(")):
        normalize(setting, value)


def test_enums_and_bools_ignore_case() -> None:
    assert same(WAL_LEVEL, "Replica", "replica") and same(FSYNC, "on", "true") and not same(FSYNC, "on", "off")
    assert same(RANDOM_PAGE_COST, "1.1", "1.10")
