"""FileMigration controller: check the table, columns and destination."""

from __future__ import annotations

from typing import Any

from .. import pg
from ..api import FILE_MIGRATION
from ..api.filemigration import FileMigrationSpec
from ..checks import TEXT_TYPES, require_column, require_table
from ..errors import DependencyError
from ..kube import ObjectRef
from .base import Context, Result, StatusWriter, profile_connection


class FileMigrationController:
    """Validates the migration against the database and its destination."""

    kind = FILE_MIGRATION

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: FileMigrationSpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        info = profile_connection(ctx, ref.namespace, spec.profile_ref.name)
        with pg.connect(info) as conn:
            columns = require_table(conn, spec.table)
            require_column(columns, spec.key_column, "keyColumn", spec.table)
            if spec.data_column in columns:
                expected = TEXT_TYPES if spec.encoding == "base64" else frozenset({"bytea"})
                what = "text or varchar for base64" if spec.encoding == "base64" else "bytea"
                require_column(columns, spec.data_column, "dataColumn", spec.table, expected, what)
            elif spec.path_column not in columns:
                # The data column may only be gone once the migration dropped it.
                require_column(columns, spec.data_column, "dataColumn", spec.table)
            for field, column in (spec.columns.wire() if spec.columns else {}).items():
                require_column(columns, column, f"columns.{field}", spec.table)
        s3 = spec.destination.s3
        if s3 and s3.credentials_secret_ref:
            secret = ctx.kube.read_secret(ref.namespace, s3.credentials_secret_ref.name)
            keys = (s3.credentials_secret_ref.access_key_id_key, s3.credentials_secret_ref.secret_access_key_key)
            if secret is None or any(k not in secret for k in keys):
                raise DependencyError(
                    f"Secret {s3.credentials_secret_ref.name!r} with keys {', '.join(keys)} not found: create "
                    "it or fix spec.destination.s3.credentialsSecretRef",
                    reason="SecretNotFound",
                )
        if not status.status.get("phase"):
            status.update(phase="Pending")
        return Result("Validated", f"{spec.table.qualified()} checked; allowed phase: {spec.phase}")
