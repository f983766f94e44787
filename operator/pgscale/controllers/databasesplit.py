"""DatabaseSplit controller: connect both databases, advance the split one step, publish the app's Secret.

The work is ``split.advance`` (resumable: its state row on the source says where it stands);
this controller parses, connects, keeps the finalizer while replication objects exist on either
server, writes the Secret naming the database that takes writes, and reports status.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import psycopg

from .. import pg
from ..api import DATABASE_SPLIT
from ..api.databasesplit import DatabaseSplitSpec, SplitEndpoint
from ..api.databasesplit import DatabaseSplitStatus as Status
from ..errors import ReconcileError, SpecError, TransientError
from ..kube import ObjectRef
from ..metrics import METRICS
from ..pg import split as sqls
from ..pg.connection import ConnInfo
from ..specs.split import connection_secret
from ..split import Report, Side, Split, advance, check, drop_replication, resolve_tables
from .base import Context, Result, StatusWriter, ensure_finalizer, load_profile

BUSY_SECONDS = 2.0  # while copying or switching
WATCH_SECONDS = 15.0  # lag is reported this often while streaming


def desired_side(spec: DatabaseSplitSpec) -> Literal["source", "target", "finalize"]:
    """Where the spec wants the writes: replicate and rollback keep them on the source."""
    if spec.phase == "finalize":
        return "finalize"
    return "target" if spec.phase == "cutover" else "source"


def reached(spec: DatabaseSplitSpec, report: Report) -> bool:
    """Whether the split is where the spec asks (Ready), not on its way."""
    want = desired_side(spec)
    if want == "finalize":
        return report.phase == "Finalized"
    return report.done and report.writes_to == want and report.phase in ("Replicating", "CutOver")


def replication_info(info: ConnInfo, endpoint: SplitEndpoint) -> ConnInfo:
    """How the other server reaches this side: the profile's connection, host and port overridden."""
    return replace(
        info,
        host=endpoint.replication_host or info.host,
        port=endpoint.replication_port or (info.port if endpoint.replication_host is None else 5432),
    )


class DatabaseSplitController:
    """Moves tables from the source profile's database to the target's, online, with a way back."""

    kind = DATABASE_SPLIT

    def _connect(self, ctx: Context, ref: ObjectRef, spec: DatabaseSplitSpec) -> tuple[ConnInfo, ConnInfo, str, str]:
        """Both profiles' connections and state schemas."""
        src_profile, src_info = load_profile(ctx, ref.namespace, spec.source.profile_ref.name)
        dst_profile, dst_info = load_profile(ctx, ref.namespace, spec.target.profile_ref.name)
        return src_info, dst_info, src_profile.state_schema, dst_profile.state_schema

    def _split(
        self,
        ref: ObjectRef,
        spec: DatabaseSplitSpec,
        conns: tuple[psycopg.Connection, psycopg.Connection],
        infos: tuple[ConnInfo, ConnInfo],
        schemas: tuple[str, str],
    ) -> Split:
        source = Side(conns[0], schemas[0], replication_info(infos[0], spec.source), infos[0])
        target = Side(conns[1], schemas[1], replication_info(infos[1], spec.target), infos[1])
        tables = resolve_tables(conns[0], spec)
        return Split(key=f"{ref.namespace}/{ref.name}", spec=spec, tables=tables, source=source, target=target)

    def reconcile(self, ctx: Context, obj: dict[str, Any], spec: DatabaseSplitSpec, status: StatusWriter) -> Result:
        ref = ObjectRef.of(obj)
        src_info, dst_info, src_schema, dst_schema = self._connect(ctx, ref, spec)
        with pg.connect(src_info) as src, pg.connect(dst_info) as dst:
            split = self._split(ref, spec, (src, dst), (src_info, dst_info), (src_schema, dst_schema))
            state = sqls.load_state(src, src_schema, split.key)
            if state is None:
                check(split)  # a refusal changes nothing, so it needs no finalizer either
            # Before the first slot: a split deleted mid-way must not leave slots holding WAL on a server.
            ensure_finalizer(ctx, self.kind, obj, needed=state is None or state.step != "finalized")
            secret = spec.secret_name_or_default(ref.name)
            try:
                report = advance(split, desired_side(spec))
            except SpecError:
                if state is None:  # refused before anything was made: nothing to clean up
                    ensure_finalizer(ctx, self.kind, obj, needed=False)
                raise
            except ReconcileError:
                # A step after a committed switch failed: the application must still be sent where writes go.
                now = sqls.load_state(src, src_schema, split.key)
                if (
                    now is not None
                    and now.step == "replicating"
                    and (state is None or now.writes_to != state.writes_to)
                ):
                    side = "target" if now.writes_to == "target" else "source"
                    info = dst_info if side == "target" else src_info
                    ctx.kube.apply(connection_secret(ref, secret, info, side))
                raise
            if report.phase == "Finalized":
                ensure_finalizer(ctx, self.kind, obj, needed=False)
        side_info = dst_info if report.writes_to == "target" else src_info
        ctx.kube.apply(connection_secret(ref, secret, side_info, report.writes_to))
        status.update(
            Status(
                phase=report.phase,
                writes_to=report.writes_to,
                tables=report.tables,
                lag_bytes=report.lag_bytes,
                lag_seconds=report.lag_seconds,
                copy_eta_seconds=report.copy_eta_seconds,
                longest_write_block_ms=report.longest_block_ms,
                last_cutover=report.last,
                connection_secret=secret,
            )
        )
        METRICS.split(
            f"{ref.namespace}/{ref.name}",
            lag_bytes=report.lag_bytes,
            longest_block_ms=report.longest_block_ms,
            on_target=report.writes_to == "target",
            ready=sum(1 for t in report.tables if t.state == "ready"),
        )
        done = reached(spec, report)
        message = f"{report.phase}: {report.message}; writes go to the {report.writes_to}"
        if not done and desired_side(spec) == "target" and report.phase == "Copying":
            message += "; the cutover waits for the initial copy"
        return Result(
            report.phase,
            message,
            done=done,
            requeue_after=(WATCH_SECONDS if done else BUSY_SECONDS) if report.phase != "Finalized" else None,
            events=report.events,
        )

    def left_behind(self, obj: dict[str, Any], spec: DatabaseSplitSpec) -> str:
        """What a split keeps on the servers when its profiles are gone, and the SQL to remove it."""
        names = sqls.Names.of(f"{obj['metadata']['namespace']}/{obj['metadata']['name']}")
        return (
            f"publication {names.publication} on both databases, subscriptions {names.forward} (target) and "
            f"{names.reverse} (source) and their slots of the same names (and pg_<oid>_sync_* slots) on the other "
            f"server: ALTER SUBSCRIPTION <name> DISABLE; ALTER SUBSCRIPTION <name> SET (slot_name = NONE); DROP "
            f"SUBSCRIPTION <name>; SELECT pg_drop_replication_slot('<name>'); DROP PUBLICATION {names.publication}"
        )

    def finalize(self, ctx: Context, obj: dict[str, Any], spec: DatabaseSplitSpec) -> None:
        """A deleted split: drop its subscriptions, slots and publications on both servers (tables stay)."""
        ref = ObjectRef.of(obj)
        src_info, dst_info, src_schema, dst_schema = self._connect(ctx, ref, spec)
        with pg.connect(src_info) as src, pg.connect(dst_info) as dst:
            split = Split(
                key=f"{ref.namespace}/{ref.name}",
                spec=spec,
                tables=[],
                source=Side(src, src_schema, replication_info(src_info, spec.source)),
                target=Side(dst, dst_schema, replication_info(dst_info, spec.target)),
            )
            if not sqls.try_lock(src, split.key):
                raise TransientError("a pgscale run holds the split; deletion waits for it", reason="SplitBusy")
            try:
                drop_replication(split)
                sqls.forget_state(src, src_schema, split.key)
            finally:
                sqls.unlock(src, split.key)
        ctx.kube.event(ref, "ReplicationDropped", "subscriptions, slots and publications dropped on both databases")
