"""DatabaseProfile controller: connect to the primary and report what is there."""

from __future__ import annotations

from typing import Any

from .. import pg
from ..api import DATABASE_PROFILE
from ..api.databaseprofile import DatabaseProfileSpec
from ..conditions import now_rfc3339
from ..durations import seconds
from .base import Context, Result, StatusWriter, secret_connection


class DatabaseProfileController:
    """Resolves the connection, checks the server, and reports it in status."""

    kind = DATABASE_PROFILE

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: DatabaseProfileSpec, status: StatusWriter) -> Result:
        info = secret_connection(ctx, obj["metadata"]["namespace"], spec)
        with pg.connect(info) as conn:
            version, _ = pg.server_version(conn)
        status.update(serverVersion=version, lastReconcileTime=now_rfc3339())
        return Result(
            "Connected",
            f"Connected to PostgreSQL {version} at {info.describe()}",
            requeue_after=seconds(spec.reconcile_interval),
        )
