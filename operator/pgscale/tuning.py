"""Postgres settings for a DatabaseProfile: pgtune's rules for web/OLTP, plus explicit overrides.

Pure: no connection, no clock. The settings reconciler applies what :func:`desired`
returns; the monitor compares :func:`estimated_memory_bytes` with the primary's
memory; capacity sampling names the tier that :func:`recommend_tier` calls for.

Memory values are written as postgresql.conf accepts them: an integer with the
largest of kB, MB or GB that expresses the value exactly (Postgres units are
1024-based, 1MB = 1024kB), rounded down to the setting's own unit (8kB pages for
shared_buffers, wal_buffers and effective_cache_size, kB for the rest).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

from .api.databaseprofile import FORBIDDEN_PARAMETERS, DatabaseProfileSpec, Tier
from .errors import SpecError
from .quantity import parse_quantity

Storage = Literal["ssd", "hdd", "network"]
Source = Literal["tier", "resources", "parameters"]

KB = 1024
MB = 1024 * KB
GB = 1024 * MB
TB = 1024 * GB
PAGE = 8 * KB  # BLCKSZ of a stock build: the unit of shared_buffers, wal_buffers, effective_cache_size


@dataclass(frozen=True)
class Hardware:
    """What a tier stands for: the same facts as ResourcesSpec, memory already in bytes."""

    cpu: int
    memory_bytes: int
    storage: Storage = "ssd"
    disk_bytes: int | None = None  # the strategy's disk, only to explain recommend_tier


# The strategy's "Hardware Recommendations" (GB read as GiB, as Kubernetes quantities are).
TIERS: Mapping[Tier, Hardware] = MappingProxyType(
    {
        "development": Hardware(cpu=2, memory_bytes=4 * GB, storage="ssd", disk_bytes=50 * GB),
        "production": Hardware(cpu=4, memory_bytes=16 * GB, storage="ssd", disk_bytes=500 * GB),
        "high-load": Hardware(cpu=8, memory_bytes=32 * GB, storage="ssd", disk_bytes=1 * TB),
    }
)

# recommend_tier: a database should stay under ~40% of its disk, leaving room for WAL
# (max_wal_size 4GB), temp files, a table rewrite (VACUUM FULL, pg_repack, ALTER TABLE
# doubles a table while it runs) and a dump. 40% of production's 500 GB is 200 GB.
# 40% of development's 50 GB would be 20 GB, but that box has 4 GB of RAM (3 GB of
# cache): past ~10 GB the working set of a growing database no longer fits, and
# 10 GB/month is also the strategy's growth alert, so development ends at 10 GB.
DEVELOPMENT_LIMIT_BYTES = 10 * GB
PRODUCTION_LIMIT_BYTES = 200 * GB

# max_connections when none is given: pgtune's "web" profile uses 200 for all sizes;
# a small box cannot give 200 backends useful work_mem, a large one serves more
# clients, so the default scales with memory (production's 16 GB gets the strategy's 200).
_CONNECTIONS_BY_MEMORY: tuple[tuple[int, int], ...] = ((8 * GB - 1, 100), (16 * GB, 200))
_CONNECTIONS_ABOVE = 300

# Postgres defaults used by estimated_memory_bytes when a setting is not given.
_AUTOVACUUM_MAX_WORKERS = 3
_WAL_SEGMENT = 16 * MB


def default_max_connections(memory_bytes: int) -> int:
    """max_connections for a box of this memory: 100 below 8 GB, 200 up to 16 GB, 300 above."""
    for limit, connections in _CONNECTIONS_BY_MEMORY:
        if memory_bytes <= limit:
            return connections
    return _CONNECTIONS_ABOVE


def format_memory(nbytes: int, unit: int = KB) -> str:
    """``nbytes`` rounded down to ``unit`` (kB or 8kB pages), in the largest exact unit of kB, MB, GB."""
    nbytes = max(nbytes - nbytes % unit, unit)
    for size, suffix in ((GB, "GB"), (MB, "MB")):
        if nbytes % size == 0:
            return f"{nbytes // size}{suffix}"
    return f"{nbytes // KB}kB"


def compute(cpu: int, memory_bytes: int, storage: str, max_connections: int | None) -> dict[str, str]:
    """pgtune's web/OLTP settings for this hardware, as postgresql.conf strings.

    Raises ValueError for hardware that cannot exist (no CPU, no memory, unknown storage).
    """
    if cpu < 1:
        raise ValueError(f"cpu must be at least 1, not {cpu}")
    if memory_bytes < MB:
        raise ValueError(f"memory must be at least 1Mi, not {memory_bytes} bytes")
    if storage not in ("ssd", "hdd", "network"):
        raise ValueError(f"storage must be ssd, hdd or network, not {storage!r}")
    connections = max_connections if max_connections is not None else default_max_connections(memory_bytes)
    if connections < 1:
        raise ValueError(f"max_connections must be at least 1, not {connections}")

    # A quarter of memory for Postgres's own cache; the kernel's page cache does the rest.
    shared_buffers = max(_floor(memory_bytes // 4, PAGE), 128 * KB)
    # What the planner may assume is cached (shared_buffers + page cache); allocates nothing.
    effective_cache_size = _floor(memory_bytes * 3 // 4, PAGE)
    # VACUUM and CREATE INDEX; more than 2GB buys nothing (and autovacuum multiplies it).
    maintenance_work_mem = max(min(memory_bytes // 16, 2 * GB), MB)
    # pgtune: 3% of shared_buffers, at least 32kB, at most one WAL segment (16MB);
    # values just under 16MB round up to it.
    wal_buffers = shared_buffers * 3 // 100
    if wal_buffers > 14 * MB:
        wal_buffers = 16 * MB
    wal_buffers = max(_floor(wal_buffers, PAGE), 32 * KB)

    workers_per_gather = min(math.ceil(cpu / 2), 4)
    # Each connection may run several sorts/hashes at once (x3) and each parallel
    # worker gets its own work_mem; memory outside shared_buffers is what they share.
    work_mem = (memory_bytes - shared_buffers) // (connections * 3) // workers_per_gather
    work_mem = max(_floor(work_mem, KB), 64 * KB)

    return {
        "max_connections": str(connections),
        "shared_buffers": format_memory(shared_buffers, PAGE),
        "effective_cache_size": format_memory(effective_cache_size, PAGE),
        "maintenance_work_mem": format_memory(maintenance_work_mem),
        "checkpoint_completion_target": "0.9",
        "wal_buffers": format_memory(wal_buffers, PAGE),
        "default_statistics_target": "100",
        # Random reads cost about what sequential ones do on SSD and network storage.
        "random_page_cost": "4" if storage == "hdd" else "1.1",
        # Concurrent prefetch requests the storage serves well: pgtune's HDD, SSD and SAN figures.
        "effective_io_concurrency": {"ssd": "200", "hdd": "2", "network": "300"}[storage],
        "work_mem": format_memory(work_mem),
        "huge_pages": "off",  # "try" can SIGBUS in containers whose cgroup has no hugetlb quota
        "min_wal_size": "1GB",
        "max_wal_size": "4GB",
        # Never below Postgres's default 8: extensions (pg_cron) and logical replication
        # take background workers from the same pool as parallel queries.
        "max_worker_processes": str(max(cpu, 8)),
        "max_parallel_workers_per_gather": str(workers_per_gather),
        "max_parallel_workers": str(cpu),
        "max_parallel_maintenance_workers": str(min(math.ceil(cpu / 2), 4)),
    }


def desired(spec: DatabaseProfileSpec) -> dict[str, tuple[str, str]]:
    """Every setting the profile manages: name -> (value, source); explicit parameters win.

    An explicit max_connections also sizes the computed work_mem, so the two agree.
    """
    for name in spec.parameters:
        if name.strip().lower() in FORBIDDEN_PARAMETERS:
            raise SpecError(
                f"parameters.{name}",
                "this setting would break the server, replication or pgscale's connection and cannot be "
                "managed; remove it (see docs/databaseprofile.md)",
            )
    if spec.tier is not None and spec.resources is not None:
        raise SpecError("resources", "set either tier or resources, not both")

    explicit_connections = _positive_int(spec.parameters.get("max_connections"))
    computed: dict[str, str] = {}
    source: Source = "parameters"
    if spec.tier is not None:
        hw = TIERS[spec.tier]
        computed = compute(hw.cpu, hw.memory_bytes, hw.storage, explicit_connections)
        source = "tier"
    elif spec.resources is not None:
        res = spec.resources
        try:
            memory = parse_quantity(res.memory)
        except ValueError as exc:
            raise SpecError("resources.memory", str(exc)) from exc
        if memory < MB:
            raise SpecError(
                "resources.memory", f"{res.memory!r} is less than 1Mi; give the primary's memory, e.g. 16Gi"
            )
        connections = explicit_connections if explicit_connections is not None else res.max_connections
        computed = compute(res.cpu, memory, res.storage, connections)
        source = "resources"

    out = {name: (value, str(source)) for name, value in computed.items()}
    out.update({name: (value, "parameters") for name, value in spec.parameters.items()})
    return out


def recommend_tier(projected_bytes: int) -> Tier:
    """The tier whose disk a database of this projected size fits (see the limits above)."""
    if projected_bytes < DEVELOPMENT_LIMIT_BYTES:
        return "development"
    if projected_bytes < PRODUCTION_LIMIT_BYTES:
        return "production"
    return "high-load"


_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(B|kB|MB|GB|TB)?\s*$")
_UNIT = {"B": 1, "kB": KB, "MB": MB, "GB": GB, "TB": TB}
# The unit a bare number means, as pg_settings.unit says (SHOW adds units; pg_settings.setting does not).
_BASE_UNIT = {
    "shared_buffers": PAGE,
    "wal_buffers": PAGE,
    "effective_cache_size": PAGE,
    "work_mem": KB,
    "maintenance_work_mem": KB,
    "autovacuum_work_mem": KB,
}


def parse_memory(name: str, value: str) -> int | None:
    """Bytes of a memory setting's value ("256MB", "16384" pages, "-1"); None when not a size."""
    match = _MEMORY.match(value)
    if not match:
        return None
    unit = _UNIT[match.group(2)] if match.group(2) else _BASE_UNIT.get(name, KB)
    return int(float(match.group(1)) * unit)


def estimated_memory_bytes(settings: Mapping[str, str]) -> int | None:
    """Worst-case memory these settings allow, for the memory alert; None when it cannot be told.

    shared_buffers + max_connections * work_mem + autovacuum_max_workers * maintenance_work_mem
    (or autovacuum_work_mem when set) + wal_buffers. Needs shared_buffers, max_connections,
    work_mem and maintenance_work_mem; the others default as in Postgres.
    """
    shared_buffers = _setting(settings, "shared_buffers")
    work_mem = _setting(settings, "work_mem")
    maintenance_work_mem = _setting(settings, "maintenance_work_mem")
    connections = _positive_int(settings.get("max_connections"))
    if shared_buffers is None or work_mem is None or maintenance_work_mem is None or connections is None:
        return None
    autovacuum_workers = _positive_int(settings.get("autovacuum_max_workers"))
    if autovacuum_workers is None:
        autovacuum_workers = _AUTOVACUUM_MAX_WORKERS
    autovacuum_mem = _setting(settings, "autovacuum_work_mem")
    if autovacuum_mem is None:  # -1: autovacuum uses maintenance_work_mem
        autovacuum_mem = maintenance_work_mem
    wal_buffers = _setting(settings, "wal_buffers")
    if wal_buffers is None:  # -1: Postgres's own 1/32 of shared_buffers
        wal_buffers = min(max(shared_buffers // 32, 64 * KB), _WAL_SEGMENT)
    return shared_buffers + connections * work_mem + autovacuum_workers * autovacuum_mem + wal_buffers


def _setting(settings: Mapping[str, str], name: str) -> int | None:
    """Bytes of a memory setting; -1 ("use the default") and anything unreadable are None."""
    value = settings.get(name)
    if value is None:
        return None
    nbytes = parse_memory(name, value)
    return nbytes if nbytes is not None and nbytes > 0 else None


def _floor(nbytes: int, unit: int) -> int:
    return nbytes - nbytes % unit


def _positive_int(value: str | None) -> int | None:
    if value is None or not re.fullmatch(r"\s*[0-9]+\s*", value):
        return None
    number = int(value)
    return number if number > 0 else None
