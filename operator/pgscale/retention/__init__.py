"""RetentionPolicy's logic: pure planning (planning.py) and the preparation its controller and
its job share (preparation.py). The SQL is in pg/retention.py and pg/relationships.py."""

from .planning import (
    Listed,
    Relationships,
    TableFacts,
    archive_name,
    batch_aim,
    batch_cap,
    batch_pages,
    check_archive,
    effect_of,
    next_batch_size,
    next_export_pages,
    plan,
    plan_relationships,
    row_lock_wait,
)
from .preparation import Prepared, Stake, at_stake, prepare, unresolved_error

__all__ = [
    "Listed",
    "Prepared",
    "Relationships",
    "Stake",
    "TableFacts",
    "archive_name",
    "at_stake",
    "batch_aim",
    "batch_cap",
    "batch_pages",
    "check_archive",
    "effect_of",
    "next_batch_size",
    "next_export_pages",
    "plan",
    "plan_relationships",
    "prepare",
    "row_lock_wait",
    "unresolved_error",
]
