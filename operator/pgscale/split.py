"""Moving tables to their own database: refusals (pure words over catalog facts) and the resumable drive.

The SQL, and why each step is safe, is in ``pg/split.py``. The state row (``<stateSchema>.database_splits``
on the source) holds the step; a step in flight (``cutting_over``, ``rolling_back``) is resolved on the
next call by the one fact that decides it, the guard trigger on the side that was locked: present, the
switch committed and is finished; absent, it did not, and what it had done on the other side is undone.
Every other step is idempotent, so a run killed anywhere continues where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import psycopg
from psycopg.conninfo import make_conninfo

from . import faults, pg
from .api.databasesplit import CutoverReport, DatabaseSplitSpec, SplitPhase, TableSync
from .errors import SpecError, TransientError
from .events import Event
from .pg import split as sqls
from .pg.connection import ConnInfo
from .pg.split import Table
from .progress import eta

log = logging.getLogger(__name__)

# Cutover starts only when the subscriber is this close (the rest is applied under the lock).
CUTOVER_LAG_BYTES = 16 * 1024 * 1024
Direction = Literal["toTarget", "toSource"]


@dataclass
class Side:
    """One database of the split: the operator's connection and how the other server reaches it."""

    conn: psycopg.Connection
    state_schema: str
    replication: ConnInfo
    info: ConnInfo | None = None  # the operator's own connection, for a second session during a switch

    def conninfo(self) -> str:
        """The connection string a subscription on the other server uses (holds the password: never logged)."""
        info = self.replication
        params: dict[str, str | int] = {"host": info.host, "port": info.port, "dbname": info.dbname, "user": info.user}
        if info.password is not None:
            params["password"] = info.password
        if info.sslmode:
            params["sslmode"] = info.sslmode
        return make_conninfo("", **params)


@dataclass
class Split:
    key: str  # namespace/name: the state row's key and the names of the replication objects
    spec: DatabaseSplitSpec
    tables: list[Table]
    source: Side
    target: Side

    @property
    def names(self) -> sqls.Names:
        return sqls.Names.of(self.key)

    @property
    def state_schema(self) -> str:
        return self.source.state_schema


@dataclass
class Report:
    """Where a split stands after one call, for status."""

    phase: SplitPhase
    writes_to: Literal["source", "target"]
    message: str
    done: bool = True  # False: work under way, look again soon
    tables: list[TableSync] = field(default_factory=list)
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    copy_eta_seconds: int | None = None
    longest_block_ms: int | None = None
    last: CutoverReport | None = None
    events: list[Event] = field(default_factory=list)


def resolve_tables(conn: psycopg.Connection, spec: DatabaseSplitSpec) -> list[Table]:
    """The tables to move, each existing on the source."""
    if spec.schema_ is not None:
        tables = sqls.schema_tables(conn, spec.schema_)
        if not tables:
            raise SpecError("schema", f"schema {spec.schema_!r} has no tables on the source", reason="TableNotFound")
        return tables
    tables = [(t.schema_, t.name) for t in spec.tables or []]
    missing = sqls.missing_tables(conn, tables)
    if missing:
        raise SpecError(
            "tables",
            f"{', '.join(map(sqls.label, missing))} not found on the source (names are case-sensitive)",
            reason="TableNotFound",
        )
    return tables


def refusals(split: Split) -> list[tuple[str, str]]:
    """Why the split cannot start, as (reason, message with the SQL fix); empty when it can."""
    src, dst = split.source.conn, split.target.conn
    out: list[tuple[str, str]] = []
    level = sqls.wal_level(src)
    if level != "logical":
        out.append(
            (
                "WalLevelNotLogical",
                f"the source runs wal_level={level}; logical replication needs logical: run ALTER SYSTEM SET "
                "wal_level = logical, then restart the server (managed services: set the parameter, e.g. "
                "rds.logical_replication = 1)",
            )
        )
    for side, conn in (("source", src), ("target", dst)):
        if not sqls.can_replicate(conn):
            role = split.source.replication.user if side == "source" else split.target.replication.user
            out.append(
                (
                    "ReplicationNotAllowed",
                    f"role {role!r} of the {side} may not stream changes: ALTER ROLE "
                    f'"{role}" WITH REPLICATION (Amazon RDS: GRANT rds_replication TO "{role}")',
                )
            )
        if not sqls.can_subscribe(conn):
            out.append(
                (
                    "ReplicationNotAllowed",
                    f"the {side}'s role may not CREATE SUBSCRIPTION: it needs superuser, or on PostgreSQL 16+ "
                    "GRANT pg_create_subscription TO the role (and CREATE on the database)",
                )
            )
    for table in sqls.without_identity(src, split.tables):
        out.append(
            (
                "NoReplicaIdentity",
                f"{sqls.label(table)} has no primary key or replica identity, so its updates and deletes cannot "
                f"be replicated: ALTER TABLE {sqls.label(table)} ADD PRIMARY KEY (...), or ALTER TABLE "
                f"{sqls.label(table)} REPLICA IDENTITY FULL",
            )
        )
    if split.spec.cross_foreign_keys == "refuse":
        for key in sqls.cross_keys(src, split.tables):
            side = "a moved table references an unmoved one" if key.outgoing else "an unmoved table references it"
            out.append(
                (
                    "CrossForeignKeys",
                    f"foreign key {key.describe()} crosses the cut ({side}): {key.drop_sql()}, or set "
                    "spec.crossForeignKeys: skip to keep it on the source only",
                )
            )
    for table in sqls.partitioned(src, split.tables):
        out.append(
            (
                "PartitionedTable",
                f"{sqls.label(table)} is partitioned; DatabaseSplit moves plain tables only: move its partitions' "
                "rows by other means, or convert it back to a plain table",
            )
        )
    for problem in sqls.differing_targets(src, dst, split.tables):
        out.append(("TargetTableDiffers", problem))
    existing = [t for t in split.tables if sqls.table_oid(dst, t) is not None]
    for table in sqls.without_identity(dst, existing):
        out.append(
            (
                "TargetTableDiffers",
                f"{sqls.label(table)} exists on the target without a primary key or replica identity, so replicated "
                f"updates and deletes cannot find their rows: add the source's key there, or DROP TABLE "
                f"{sqls.label(table)} on the target and pgscale creates it",
            )
        )
    return out


def _report(split: Split, state: sqls.State, message: str, *, done: bool = True) -> Report:
    names = split.names
    writes_to: Literal["source", "target"] = "target" if state.writes_to == "target" else "source"
    last = None
    if state.last_direction and state.last_at is not None:
        last = CutoverReport(
            direction="toTarget" if state.last_direction == "toTarget" else "toSource",
            time=state.last_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            write_block_ms=state.last_block_ms or 0,
            lock_retries=state.lock_retries,
            rows_verified=state.last_rows or 0,
        )
    report = Report(
        phase="Replicating",
        writes_to=writes_to,
        message=message,
        done=done,
        longest_block_ms=state.longest_block_ms if state.last_direction else None,
        last=last,
    )
    if state.step == "finalized":
        report.phase = "Finalized"
        return report
    if state.step == "cutting_over":
        report.phase = "CuttingOver"
    elif state.step == "rolling_back":
        report.phase = "RollingBack"
    elif writes_to == "target":
        report.phase = "CutOver"
    # The subscription that keeps the other side current, and its slot on the side taking writes.
    if writes_to == "source":
        sub_conn, pub_conn, name = split.target.conn, split.source.conn, names.forward
    else:
        sub_conn, pub_conn, name = split.source.conn, split.target.conn, names.reverse
    states = sqls.sync_states(sub_conn, name)
    for table in split.tables:
        key = f"{table[0]}.{table[1]}"
        rows = sqls.estimated_rows(split.source.conn, table)
        report.tables.append(TableSync(name=key, state=states.get(key, "unknown"), rows=rows))
    report.lag_bytes = sqls.slot_lag_bytes(pub_conn, name)
    report.lag_seconds = sqls.lag_seconds(sub_conn, name)
    copying = states and any(s != "ready" for s in states.values())
    if writes_to == "source" and copying and state.copy_started_at is not None and report.phase == "Replicating":
        report.phase = "Copying"
        total = sqls.table_bytes(split.source.conn, split.tables)
        done_bytes = sqls.table_bytes(split.target.conn, split.tables)
        elapsed = max((datetime.now(UTC) - state.copy_started_at).total_seconds(), 1e-3)
        report.copy_eta_seconds = eta(done_bytes, total, done_bytes / elapsed) if done_bytes else None
    return report


def ready_tables(split: Split, subscription: str, on: psycopg.Connection) -> bool:
    states = sqls.sync_states(on, subscription)
    return len(states) >= len(split.tables) and all(s == "ready" for s in states.values())


def check(split: Split) -> None:
    """Raise every refusal at once (a SpecError with the first one's reason); nothing is changed."""
    problems = refusals(split)
    if problems:
        raise SpecError(
            "tables" if problems[0][0] not in ("WalLevelNotLogical", "ReplicationNotAllowed") else "source",
            "; ".join(message for _, message in problems) + "; nothing was changed",
            reason=problems[0][0],
        )


def _prepare(split: Split) -> None:
    """Check everything, then create the tables on the target (guarded) and the state row."""
    check(split)
    src, dst = split.source.conn, split.target.conn
    defs = sqls.definitions(src, split.tables, skip_cross_keys=split.spec.cross_foreign_keys == "skip")
    for table in split.tables:
        if sqls.table_oid(dst, table) is not None and sqls.has_rows(dst, table):
            raise SpecError(
                "target",
                f"{sqls.label(table)} exists on the target with rows; the initial copy would duplicate them: "
                f"TRUNCATE {sqls.label(table)} there, or drop it; nothing was changed",
                reason="TargetTableDiffers",
            )
    sqls.ensure_guard_function(dst, split.target.state_schema)
    sqls.ensure_guard_function(src, split.source.state_schema)
    sqls.create_tables(dst, defs)
    with dst.transaction():
        sqls.guard(dst, split.target.state_schema, split.tables, split.key)
    sqls.ensure_state(src, split.state_schema)
    sqls.save_state(src, split.state_schema, split.key, step="replicating", writes_to="source")


def advance(split: Split, desired: Literal["source", "target", "finalize"]) -> Report:
    """Take the split one step towards what the spec asks: idempotent, resumable after a kill anywhere.

    One run at a time per split (a session advisory lock on the source: a killed run frees it), so an
    old leader still finishing a reconcile cannot interleave with the new one."""
    src = split.source.conn
    if not sqls.try_lock(src, split.key):
        raise TransientError(
            "another pgscale run is working on this split; looked at again shortly", reason="SplitBusy", retry_seconds=5
        )
    try:
        return _advance(split, desired)
    finally:
        sqls.unlock(src, split.key)


def _advance(split: Split, desired: Literal["source", "target", "finalize"]) -> Report:
    src = split.source.conn
    state = sqls.load_state(src, split.state_schema, split.key)
    events: list[Event] = []
    if state is None:
        _prepare(split)
        faults.checkpoint("split-after-prepare")
        events.append(Event("TablesCreated", f"{len(split.tables)} tables created on the target"))
        state = sqls.load_state(src, split.state_schema, split.key)
        assert state is not None
    if state.step in ("cutting_over", "rolling_back"):
        events.append(_resolve(split, state))
        state = sqls.load_state(src, split.state_schema, split.key)
        assert state is not None
    if state.step == "finalized":
        return _report(split, state, "finalized: replication objects dropped")
    if state.writes_to == "source":
        message, done = _replicate(split, state)
        if desired == "finalize":
            raise SpecError(
                "phase",
                "finalize drops the way back and needs the writes on the target: set spec.phase: cutover first",
                reason="NotCutOver",
            )
        if done and desired == "target" and ready_tables(split, split.names.forward, split.target.conn):
            events.append(_switch(split, "toTarget"))
            state = sqls.load_state(src, split.state_schema, split.key)
            assert state is not None
            message, done = _reverse(split)
    elif desired == "finalize":  # without building the way back first (a finalize killed mid-way goes on)
        finalize(split)
        events.append(Event("Finalized", "replication objects dropped on both databases"))
        state = sqls.load_state(src, split.state_schema, split.key)
        assert state is not None
        report = _report(split, state, "finalized: replication objects dropped")
        report.events = events
        return report
    else:
        message, done = _reverse(split)
        if desired == "source":
            events.append(_switch(split, "toSource"))
            state = sqls.load_state(src, split.state_schema, split.key)
            assert state is not None
            message, done = _replicate(split, state)
    report = _report(split, state, message, done=done)
    report.events = events
    return report


def _replicate(split: Split, state: sqls.State) -> tuple[str, bool]:
    """Source -> target: publication, slot, subscription (with the initial copy the first time)."""
    names, src, dst = split.names, split.source.conn, split.target.conn
    with src.transaction():
        sqls.unguard(src, split.tables)
    found = sqls.drop_subscription(src, names.reverse)  # after a rollback: the way back is not needed now
    if found is not None or sqls.slot_exists(dst, names.reverse):
        sqls.drop_slots(dst, names.reverse, found)
    sqls.ensure_publication(src, names.publication, split.tables)
    sqls.ensure_slot(src, names.forward)
    faults.checkpoint("split-after-slot")
    if sqls.subscription(dst, names.forward) is None:
        first = state.last_direction is None
        sqls.create_subscription(
            dst,
            name=names.forward,
            conninfo=split.source.conninfo(),
            publication=names.publication,
            copy_data=first,
        )
        if first:
            sqls.save_state(src, split.state_schema, split.key, copy_started_at=datetime.now(UTC))
    else:
        sqls.enable_subscription(dst, names.forward)
    faults.checkpoint("split-after-subscription")
    if not ready_tables(split, names.forward, dst):
        return "initial copy under way", False
    return "streaming source to target; set spec.phase: cutover to move writes", True


def _reverse(split: Split) -> tuple[str, bool]:
    """After a cutover: the forward subscription gone, target -> source streaming on the slot made in the switch."""
    names, src, dst = split.names, split.source.conn, split.target.conn
    with dst.transaction():
        sqls.unguard(dst, split.tables)
    found = sqls.drop_subscription(dst, names.forward)
    if found is not None or sqls.slot_exists(src, names.forward):
        sqls.drop_slots(src, names.forward, found)
    sqls.ensure_publication(dst, names.publication, split.tables)
    sqls.ensure_slot(dst, names.reverse)
    faults.checkpoint("split-after-reverse-slot")
    if sqls.subscription(src, names.reverse) is None:
        sqls.create_subscription(
            src, name=names.reverse, conninfo=split.target.conninfo(), publication=names.publication, copy_data=False
        )
    else:
        sqls.enable_subscription(src, names.reverse)
    return "writes go to the target; the source is kept current (spec.phase: rollback or finalize)", True


def _resolve(split: Split, state: sqls.State) -> Event:
    """A switch that a killed run left in flight: finish it if it committed, else undo its side effects."""
    names, src, dst = split.names, split.source.conn, split.target.conn
    to_target = state.step == "cutting_over"
    locked, other = (src, dst) if to_target else (dst, src)
    subscription = names.forward if to_target else names.reverse
    new_slot = names.reverse if to_target else names.forward
    if sqls.guarded(locked, split.tables[0]):
        with other.transaction():
            sqls.unguard(other, split.tables)
        sqls.save_state(
            src,
            split.state_schema,
            split.key,
            step="replicating",
            writes_to="target" if to_target else "source",
            last_direction="toTarget" if to_target else "toSource",
            last_at=datetime.now(UTC),
        )
        return Event("SwitchResumed", "an interrupted switch had committed; it was finished")
    sqls.enable_subscription(other, subscription)
    sqls.drop_slots(other, new_slot, None)
    sqls.save_state(src, split.state_schema, split.key, step="replicating")
    return Event("SwitchUndone", "an interrupted switch had not committed; it was undone and is retried")


class CatchUpTimeout(Exception):
    """The subscriber did not confirm the locked side's position within catchUpTimeout."""


class ChecksumMismatch(Exception):
    """Both sides differ after the catch-up (should never happen): the switch is undone."""


def _switch(split: Split, direction: Direction) -> Event:
    """Move writes under the lock budget: block writes on the side taking them, let the other catch up,
    sequences, verify, guard; retried within lockTimeout x retries. Returns the Event to record."""
    names, src = split.names, split.source.conn
    to_target = direction == "toTarget"
    frm, to = (split.source, split.target) if to_target else (split.target, split.source)
    subscription = names.forward if to_target else names.reverse  # on `to`, its slot on `frm`
    new_slot = names.reverse if to_target else names.forward  # on `to`, for the way back
    lag = sqls.slot_lag_bytes(frm.conn, subscription)
    if lag is None or lag > CUTOVER_LAG_BYTES:
        raise TransientError(
            f"the subscriber is {lag} bytes behind; the switch waits until it is under {CUTOVER_LAG_BYTES}",
            reason="CatchingUp",
            retry_seconds=2,
        )
    sqls.ensure_publication(to.conn, names.publication, split.tables)
    sqls.ensure_guard_function(frm.conn, frm.state_schema)
    if sqls.subscription(frm.conn, new_slot) is None:  # a slot left from an earlier way back is stale
        sqls.drop_slots(to.conn, new_slot, None)
    sqls.save_state(src, split.state_schema, split.key, step="cutting_over" if to_target else "rolling_back")
    faults.checkpoint("split-before-lock")
    with contextlib.ExitStack() as stack:
        flusher = stack.enter_context(pg.connect(frm.info)) if frm.info is not None else None
        return _attempts(split, direction, flusher)


def _stopwatch(steps: dict[str, float], started: float) -> Callable[[str], None]:
    """Record how long each step of a switch took since the previous one."""
    mark = [started]

    def took(step: str) -> None:
        now = time.monotonic()
        steps[step] = now - mark[0]
        mark[0] = now

    return took


def _fingerprints(
    here: psycopg.Connection, there: psycopg.Connection, table: Table
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Count and checksum of a table on both servers at once (the other side in a thread): the writes wait."""
    cols = sqls.replicated_columns(here, table)
    with ThreadPoolExecutor(max_workers=1) as pool:
        theirs = pool.submit(sqls.fingerprint, there, table, cols)
        mine = sqls.fingerprint(here, table, cols)
        return mine, theirs.result()


def _attempts(split: Split, direction: Direction, flusher: psycopg.Connection | None) -> Event:
    """The switch's attempts within the lock budget."""
    budget = split.spec.lock_budget_or_default
    names, src = split.names, split.source.conn
    to_target = direction == "toTarget"
    frm, to = (split.source, split.target) if to_target else (split.target, split.source)
    subscription = names.forward if to_target else names.reverse
    new_slot = names.reverse if to_target else names.forward
    conn = frm.conn
    for attempt in range(budget.retries + 1):
        started = time.monotonic()
        rows = 0
        try:
            steps: dict[str, float] = {}
            took = _stopwatch(steps, started)

            with conn.transaction():
                sqls.lock_tables(conn, split.tables, budget.lock_timeout_ms)
                took("lock")
                lsn = sqls.current_lsn(conn)
                if flusher is not None:  # the walsender sends only flushed WAL
                    sqls.flush_wal(flusher)
                deadline = time.monotonic() + budget.catch_up_seconds
                while not sqls.confirmed(conn, subscription, lsn):
                    if time.monotonic() > deadline:
                        raise CatchUpTimeout
                    time.sleep(0.005)
                took("catch-up")
                sqls.disable_subscription(to.conn, subscription)
                sqls.set_sequences(to.conn, sqls.sequences(conn, split.tables))
                took("sequences")
                for table in split.tables:
                    mine, theirs = _fingerprints(conn, to.conn, table)
                    if mine != theirs:
                        raise ChecksumMismatch(f"{sqls.label(table)}: {mine[0]} rows here, {theirs[0]} there")
                    rows += mine[0]
                took("verify")
                sqls.ensure_slot(to.conn, new_slot)
                took("slot")
                faults.checkpoint("split-before-guard")
                sqls.guard(conn, frm.state_schema, split.tables, split.key)
            took("commit")
            faults.checkpoint("split-after-commit")
            with to.conn.transaction():
                sqls.unguard(to.conn, split.tables)
            took("open")
            block_ms = int((time.monotonic() - started) * 1000)
            state = sqls.load_state(src, split.state_schema, split.key)
            longest = max(block_ms, state.longest_block_ms if state else 0)
            sqls.save_state(
                src,
                split.state_schema,
                split.key,
                step="replicating",
                writes_to="target" if to_target else "source",
                last_direction=direction,
                last_block_ms=block_ms,
                last_rows=rows,
                last_at=datetime.now(UTC),
                longest_block_ms=longest,
            )
            what = "cutover" if to_target else "rollback"
            return Event(
                "CutOver" if to_target else "RolledBack",
                f"{what}: writes blocked {block_ms} ms ("
                + ", ".join(f"{k} {v * 1000:.0f}" for k, v in steps.items())
                + f"), {rows} rows verified, attempt {attempt + 1}",
            )
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected, CatchUpTimeout) as exc:
            log.info("%s of %s: attempt %d gave way: %s", direction, split.key, attempt + 1, type(exc).__name__)
            sqls.enable_subscription(to.conn, subscription)
            sqls.note_retry(src, split.state_schema, split.key)
            time.sleep(min(0.2 * (attempt + 1), 2.0))
        except ChecksumMismatch as exc:
            sqls.enable_subscription(to.conn, subscription)
            sqls.save_state(src, split.state_schema, split.key, step="replicating")
            raise TransientError(
                f"the switch was undone: counts or checksums differ ({exc}); it is retried", reason="VerifyFailed"
            ) from exc
    sqls.save_state(src, split.state_schema, split.key, step="replicating")
    raise TransientError(
        f"the switch could not take its lock and catch up within spec.lockBudget (lockTimeout "
        f"{budget.lock_timeout}, {budget.retries} retries, catchUpTimeout {budget.catch_up_timeout}); long "
        "transactions of the application hold the tables, or the subscriber is slow: it is retried",
        reason="LockTimeout",
        retry_seconds=10,
    )


def finalize(split: Split) -> None:
    """After a cutover: drop the replication objects on both databases (and the source tables if asked)."""
    src = split.source.conn
    drop_replication(split)
    faults.checkpoint("split-after-drop-replication")
    if split.spec.drop_source_tables:
        try:
            with src.transaction():
                sqls.drop_tables(src, split.tables)
        except psycopg.errors.DependentObjectsStillExist as exc:
            raise SpecError(
                "dropSourceTables",
                "the source tables cannot be dropped, other objects depend on them "
                f"({exc.diag.message_detail or exc}); drop those (foreign keys of unmoved tables, views) first, "
                "or set dropSourceTables: false",
                reason="SourceTablesInUse",
            ) from exc
    sqls.save_state(src, split.state_schema, split.key, step="finalized")


def drop_replication(split: Split) -> None:
    """Subscriptions, their slots (table-sync slots too) and the publications, on both databases."""
    names, src, dst = split.names, split.source.conn, split.target.conn
    for sub_conn, pub_conn, name in ((dst, src, names.forward), (src, dst, names.reverse)):
        oid = sqls.drop_subscription(sub_conn, name)
        sqls.drop_slots(pub_conn, name, oid)
    sqls.drop_publication(src, names.publication)
    sqls.drop_publication(dst, names.publication)
