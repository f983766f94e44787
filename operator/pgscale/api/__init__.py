"""The pgscale API (group pgscale.io, version v1alpha1): one module per kind.

``KINDS`` lists every kind with its spec and status models; the CRD generator,
the operator and the CLI all iterate over it, so a new kind is added in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from . import cache, databaseprofile, databasesplit, filemigration, partitionpolicy, retentionpolicy
from .common import API_VERSION, GROUP, VERSION, BaseStatus, KindInfo


@dataclass(frozen=True)
class Kind:
    """A kind's naming plus the models of its spec and status."""

    info: KindInfo
    spec: type[BaseModel]
    status: type[BaseStatus]

    @property
    def plural(self) -> str:
        return self.info.plural

    @property
    def name(self) -> str:
        return self.info.kind


DATABASE_PROFILE = Kind(
    databaseprofile.INFO, databaseprofile.DatabaseProfileSpec, databaseprofile.DatabaseProfileStatus
)
PARTITION_POLICY = Kind(
    partitionpolicy.INFO, partitionpolicy.PartitionPolicySpec, partitionpolicy.PartitionPolicyStatus
)
RETENTION_POLICY = Kind(
    retentionpolicy.INFO, retentionpolicy.RetentionPolicySpec, retentionpolicy.RetentionPolicyStatus
)
FILE_MIGRATION = Kind(filemigration.INFO, filemigration.FileMigrationSpec, filemigration.FileMigrationStatus)
DATABASE_SPLIT = Kind(databasesplit.INFO, databasesplit.DatabaseSplitSpec, databasesplit.DatabaseSplitStatus)
CACHE = Kind(cache.INFO, cache.CacheSpec, cache.CacheStatus)
KINDS: tuple[Kind, ...] = (
    DATABASE_PROFILE,
    PARTITION_POLICY,
    RETENTION_POLICY,
    FILE_MIGRATION,
    DATABASE_SPLIT,
    CACHE,
)

__all__ = [
    "API_VERSION",
    "CACHE",
    "DATABASE_PROFILE",
    "DATABASE_SPLIT",
    "FILE_MIGRATION",
    "GROUP",
    "KINDS",
    "PARTITION_POLICY",
    "RETENTION_POLICY",
    "VERSION",
    "Kind",
]
