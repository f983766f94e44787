"""One controller per kind; each reconcile is parse, plan, act, write status."""

from __future__ import annotations

from typing import Any

from .base import Controller
from .cache import CacheController
from .databaseprofile import DatabaseProfileController
from .databasesplit import DatabaseSplitController
from .filemigration import FileMigrationController
from .partitionpolicy import PartitionPolicyController
from .retentionpolicy import RetentionPolicyController


def all_controllers() -> list[Controller[Any]]:
    """Every controller the operator runs."""
    return [
        DatabaseProfileController(),
        PartitionPolicyController(),
        RetentionPolicyController(),
        FileMigrationController(),
        DatabaseSplitController(),
        CacheController(),
    ]
