"""Every example parses through the models, and the models refuse what the CRD refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from pgscale.api import KINDS
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.api.partitionpolicy import PartitionPolicySpec
from pgscale.durations import seconds
from pgscale.errors import SpecError
from pgscale.schedule import next_run

ROOT = Path(__file__).resolve().parents[2]
BY_KIND = {k.name: k for k in KINDS}


@pytest.mark.parametrize("path", sorted((ROOT / "examples").glob("*.yaml")), ids=lambda p: p.name)
def test_examples_parse(path: Path) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc["apiVersion"].startswith("pgscale.io/"):
            BY_KIND[doc["kind"]].spec.model_validate(doc["spec"])


def test_strategy_parameters_are_expressible_exactly() -> None:
    doc = yaml.safe_load((ROOT / "examples" / "databaseprofile.yaml").read_text())
    spec = DatabaseProfileSpec.model_validate(doc["spec"])
    assert spec.parameters == {
        "max_connections": "200",
        "shared_buffers": "256MB",
        "effective_cache_size": "1GB",
        "work_mem": "4MB",
        "maintenance_work_mem": "64MB",
        "checkpoint_completion_target": "0.9",
        "wal_buffers": "16MB",
        "random_page_cost": "1.1",
        "effective_io_concurrency": "200",
    }


def test_identifiers_refuse_quotes() -> None:
    with pytest.raises(ValidationError):
        BY_KIND["PartitionPolicy"].spec.model_validate(
            {
                "profileRef": {"name": "app"},
                "table": {"name": 'Task"; DROP TABLE x; --'},
                "column": "c",
                "interval": "monthly",
            }
        )


def test_prisma_timestamp_precision_is_a_time_type() -> None:
    from pgscale.checks import TIME_TYPES, base_type

    assert base_type("timestamp(3) without time zone") in TIME_TYPES
    assert base_type("timestamp(6) with time zone") in TIME_TYPES
    assert base_type("character varying(20)") == "character varying"
    assert base_type("numeric(10,2)") == "numeric"


@pytest.mark.parametrize("interval", ["999999999w", "100w", "1000d", "10000h", "99999999s"])
def test_maintenance_interval_is_bounded(interval: str) -> None:
    """Accepted, 999999999w overflowed a date in the operator (OverflowError -> InternalError)."""
    with pytest.raises(ValidationError, match=r"maintenance\.interval"):
        PartitionPolicySpec.model_validate(
            {
                "profileRef": {"name": "a"},
                "table": {"name": "T"},
                "column": "c",
                "interval": "monthly",
                "maintenance": {"interval": interval},
            }
        )


@pytest.mark.parametrize("interval", ["999999999ms", "9999999s", "99w", "999d", "1h"])
def test_sensible_intervals_are_accepted(interval: str) -> None:
    spec = PartitionPolicySpec.model_validate(
        {
            "profileRef": {"name": "a"},
            "table": {"name": "T"},
            "column": "c",
            "interval": "monthly",
            "maintenance": {"interval": interval},
        }
    )
    assert spec.maintenance is not None and seconds(spec.maintenance.interval) < 3 * 366 * 86400


@pytest.mark.parametrize("schedule", ["0 0 31 4 *", "0 0 30,31 2 *", "0 0 31 jun *"])
def test_a_schedule_that_never_fires_names_the_field(schedule: str) -> None:
    with pytest.raises(SpecError) as err:
        next_run(schedule, "UTC", field="maintenance.schedule")
    assert err.value.reason == "ScheduleNeverFires" and err.value.field == "maintenance.schedule"


def test_february_29_fires() -> None:
    assert next_run("0 0 29 2 *", "UTC").month == 2
