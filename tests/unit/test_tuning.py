"""pgscale.tuning: the strategy's settings, pgtune's figures per tier, overrides and estimates."""

from __future__ import annotations

from typing import Any

import pytest

from pgscale import tuning
from pgscale.api.databaseprofile import FORBIDDEN_PARAMETERS, DatabaseProfileSpec
from pgscale.errors import SpecError

KB, MB, GB = 1024, 1024**2, 1024**3

STRATEGY = {
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


def spec(**fields: Any) -> DatabaseProfileSpec:
    return DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}, **fields})


def values(desired: dict[str, tuple[str, str]]) -> dict[str, str]:
    return {name: value for name, (value, _) in desired.items()}


def test_strategy_parameters_come_out_exactly() -> None:
    assert tuning.desired(spec(parameters=STRATEGY)) == {name: (v, "parameters") for name, v in STRATEGY.items()}


def test_no_tier_and_no_resources_means_only_parameters() -> None:
    assert tuning.desired(spec()) == {}
    assert tuning.desired(spec(parameters={"work_mem": "8MB"})) == {"work_mem": ("8MB", "parameters")}


def test_tiers_are_the_strategy_hardware() -> None:
    assert {name: (hw.cpu, hw.memory_bytes, hw.storage) for name, hw in tuning.TIERS.items()} == {
        "development": (2, 4 * GB, "ssd"),
        "production": (4, 16 * GB, "ssd"),
        "high-load": (8, 32 * GB, "ssd"),
    }


COMMON = {
    "checkpoint_completion_target": "0.9",
    "wal_buffers": "16MB",
    "default_statistics_target": "100",
    "random_page_cost": "1.1",
    "effective_io_concurrency": "200",
    "huge_pages": "off",
    "min_wal_size": "1GB",
    "max_wal_size": "4GB",
    "max_worker_processes": "8",
}

TIER_FIGURES = {
    "development": {
        "max_connections": "100",
        "shared_buffers": "1GB",
        "effective_cache_size": "3GB",
        "maintenance_work_mem": "256MB",
        "work_mem": "10485kB",
        "max_parallel_workers_per_gather": "1",
        "max_parallel_workers": "2",
        "max_parallel_maintenance_workers": "1",
    },
    "production": {
        "max_connections": "200",
        "shared_buffers": "4GB",
        "effective_cache_size": "12GB",
        "maintenance_work_mem": "1GB",
        "work_mem": "10485kB",
        "max_parallel_workers_per_gather": "2",
        "max_parallel_workers": "4",
        "max_parallel_maintenance_workers": "2",
    },
    "high-load": {
        "max_connections": "300",
        "shared_buffers": "8GB",
        "effective_cache_size": "24GB",
        "maintenance_work_mem": "2GB",
        "work_mem": "6990kB",
        "max_parallel_workers_per_gather": "4",
        "max_parallel_workers": "8",
        "max_parallel_maintenance_workers": "4",
    },
}


@pytest.mark.parametrize("tier", sorted(TIER_FIGURES))
def test_tier_figures(tier: str) -> None:
    got = tuning.desired(spec(tier=tier))
    assert values(got) == {**COMMON, **TIER_FIGURES[tier]}
    assert {source for _, source in got.values()} == {"tier"}


def test_resources_equal_to_a_tier_give_its_figures_with_source_resources() -> None:
    got = tuning.desired(spec(resources={"cpu": 4, "memory": "16Gi"}))
    assert values(got) == values(tuning.desired(spec(tier="production")))
    assert {source for _, source in got.values()} == {"resources"}


def test_explicit_parameters_override_the_tier() -> None:
    got = tuning.desired(spec(tier="production", parameters={"shared_buffers": "2GB", "jit": "off"}))
    assert got["shared_buffers"] == ("2GB", "parameters")
    assert got["jit"] == ("off", "parameters")
    assert got["effective_cache_size"] == ("12GB", "tier")


def test_explicit_max_connections_sizes_work_mem() -> None:
    got = tuning.desired(spec(tier="production", parameters={"max_connections": "400"}))
    assert got["max_connections"] == ("400", "parameters")
    # (16GB - 4GB) / (400 * 3) / 2 workers per gather = 5242.88kB
    assert got["work_mem"] == ("5242kB", "tier")


def test_resources_max_connections_sizes_work_mem() -> None:
    got = tuning.desired(spec(resources={"cpu": 4, "memory": "16Gi", "maxConnections": 100}))
    assert got["max_connections"] == ("100", "resources")
    assert got["work_mem"] == ("20971kB", "resources")


@pytest.mark.parametrize("name", ["listen_addresses", "wal_level", "port", "primary_conninfo"])
def test_forbidden_parameter_raises(name: str) -> None:
    assert name in FORBIDDEN_PARAMETERS
    # the CRD refuses these; build the spec past validation to check the defence in depth
    bad = spec(tier="production").model_copy(update={"parameters": {"work_mem": "4MB", name: "x"}})
    with pytest.raises(SpecError) as err:
        tuning.desired(bad)
    assert err.value.field == f"parameters.{name}"
    assert f"spec.parameters.{name}" in err.value.message


def test_forbidden_parameter_is_caught_in_any_case() -> None:
    bad = spec().model_copy(update={"parameters": {"Listen_Addresses": "*"}})
    with pytest.raises(SpecError):
        tuning.desired(bad)


def test_unreadable_memory_is_a_spec_error() -> None:
    with pytest.raises(SpecError) as err:
        tuning.desired(spec(resources={"cpu": 2, "memory": "500m"}))
    assert err.value.field == "resources.memory"


@pytest.mark.parametrize(
    ("storage", "random_page_cost", "io_concurrency"),
    [("ssd", "1.1", "200"), ("hdd", "4", "2"), ("network", "1.1", "300")],
)
def test_storage_decides_random_page_cost_and_io_concurrency(
    storage: str, random_page_cost: str, io_concurrency: str
) -> None:
    got = values(tuning.desired(spec(resources={"cpu": 4, "memory": "16Gi", "storage": storage})))
    assert got["random_page_cost"] == random_page_cost
    assert got["effective_io_concurrency"] == io_concurrency


@pytest.mark.parametrize(
    ("memory", "connections"),
    [(4 * GB, 100), (8 * GB - 1, 100), (8 * GB, 200), (16 * GB, 200), (16 * GB + 1, 300), (64 * GB, 300)],
)
def test_default_max_connections_by_memory(memory: int, connections: int) -> None:
    assert tuning.default_max_connections(memory) == connections


def test_small_memory_wal_buffers_is_three_percent_in_whole_pages() -> None:
    got = tuning.compute(1, 512 * MB, "ssd", None)
    assert got["shared_buffers"] == "128MB"
    assert got["wal_buffers"] == "3928kB"  # 3% of 128MB = 3932.16kB, down to 8kB pages
    assert got["maintenance_work_mem"] == "32MB"
    assert got["work_mem"] == "1310kB"


def test_wal_buffers_near_16mb_rounds_up() -> None:
    # shared_buffers 480MB: 3% is 14.4MB, pgtune takes the whole 16MB segment
    assert tuning.compute(2, 1920 * MB, "ssd", None)["wal_buffers"] == "16MB"


def test_floors_keep_values_postgres_accepts() -> None:
    got = tuning.compute(1, MB, "ssd", 10)
    assert got["shared_buffers"] == "256kB"
    assert got["wal_buffers"] == "32kB"
    assert got["maintenance_work_mem"] == "1MB"
    assert got["work_mem"] == "64kB"


def test_large_cpu_counts_cap_parallel_workers_per_gather() -> None:
    got = tuning.compute(64, 256 * GB, "ssd", None)
    assert got["max_worker_processes"] == "64"
    assert got["max_parallel_workers"] == "64"
    assert got["max_parallel_workers_per_gather"] == "4"
    assert got["max_parallel_maintenance_workers"] == "4"
    assert got["maintenance_work_mem"] == "2GB"


def test_decimal_memory_rounds_down_to_pages() -> None:
    got = tuning.compute(2, 4 * 10**9, "ssd", None)
    assert got["shared_buffers"] == "976560kB"  # 1e9 bytes = 976562.5kB, down to 8kB pages
    assert got["effective_cache_size"] == "2929680kB"


@pytest.mark.parametrize(("cpu", "memory", "storage"), [(0, 4 * GB, "ssd"), (2, 0, "ssd"), (2, 4 * GB, "nvme")])
def test_impossible_hardware_is_refused(cpu: int, memory: int, storage: str) -> None:
    with pytest.raises(ValueError):
        tuning.compute(cpu, memory, storage, None)


@pytest.mark.parametrize(
    ("nbytes", "unit", "text"),
    [
        (16 * GB, KB, "16GB"),
        (1536 * MB, KB, "1536MB"),
        (10485 * KB, KB, "10485kB"),
        (10485 * KB + 1000, KB, "10485kB"),
        (64 * KB, KB, "64kB"),
        (3932 * KB, 8 * KB, "3928kB"),
        (0, KB, "1kB"),
        (1024 * GB, KB, "1024GB"),
    ],
)
def test_format_memory(nbytes: int, unit: int, text: str) -> None:
    assert tuning.format_memory(nbytes, unit) == text


@pytest.mark.parametrize(
    ("name", "value", "nbytes"),
    [
        ("shared_buffers", "256MB", 256 * MB),
        ("shared_buffers", "16384", 128 * MB),
        ("wal_buffers", "2048", 16 * MB),
        ("work_mem", "4096", 4 * MB),
        ("maintenance_work_mem", "1 GB", GB),
        ("work_mem", "1TB", 1024 * GB),
        ("work_mem", "512B", 512),
        ("work_mem", "-1", None),
        ("work_mem", "4mb", None),
        ("work_mem", "", None),
    ],
)
def test_parse_memory(name: str, value: str, nbytes: int | None) -> None:
    assert tuning.parse_memory(name, value) == nbytes


def test_estimated_memory_of_the_strategy() -> None:
    # 256MB + 200 * 4MB + 3 * 64MB + 16MB
    assert tuning.estimated_memory_bytes(STRATEGY) == (256 + 800 + 192 + 16) * MB


def test_estimated_memory_of_a_tier_fits_its_memory() -> None:
    settings = values(tuning.desired(spec(tier="production")))
    estimate = tuning.estimated_memory_bytes(settings)
    assert estimate == 4 * GB + 200 * 10485 * KB + 3 * GB + 16 * MB
    assert estimate < 16 * GB


def test_estimated_memory_reads_units_as_pg_settings_reports_them() -> None:
    raw = {
        "shared_buffers": "32768",
        "max_connections": "100",
        "work_mem": "4096",
        "maintenance_work_mem": "65536",
        "wal_buffers": "2048",
        "autovacuum_max_workers": "5",
    }
    assert tuning.estimated_memory_bytes(raw) == 256 * MB + 100 * 4 * MB + 5 * 64 * MB + 16 * MB


def test_estimated_memory_defaults() -> None:
    # wal_buffers -1: 1/32 of shared_buffers; autovacuum_work_mem replaces maintenance_work_mem for autovacuum
    settings = {
        "shared_buffers": "128MB",
        "max_connections": "10",
        "work_mem": "1MB",
        "maintenance_work_mem": "1GB",
        "autovacuum_work_mem": "64MB",
        "wal_buffers": "-1",
    }
    assert tuning.estimated_memory_bytes(settings) == 128 * MB + 10 * MB + 3 * 64 * MB + 4 * MB


@pytest.mark.parametrize("missing", ["shared_buffers", "max_connections", "work_mem", "maintenance_work_mem"])
def test_estimated_memory_needs_the_main_settings(missing: str) -> None:
    settings = {k: v for k, v in STRATEGY.items() if k != missing}
    assert tuning.estimated_memory_bytes(settings) is None
    assert tuning.estimated_memory_bytes({**STRATEGY, missing: "lots"}) is None


@pytest.mark.parametrize(
    ("projected", "tier"),
    [
        (0, "development"),
        (10 * GB - 1, "development"),
        (10 * GB, "production"),
        (200 * GB - 1, "production"),
        (200 * GB, "high-load"),
        (2 * 1024 * GB, "high-load"),
    ],
)
def test_recommend_tier(projected: int, tier: str) -> None:
    assert tuning.recommend_tier(projected) == tier


def test_recommend_tier_keeps_production_under_40_percent_of_its_disk() -> None:
    disk = tuning.TIERS["production"].disk_bytes
    assert disk is not None
    assert disk * 40 // 100 == tuning.PRODUCTION_LIMIT_BYTES
