"""RetentionPolicy's action export, as `pgscale job retention` runs it: batches of old rows (with
their children, per spec.children) leave the database as verified Parquet files.

Per batch:

1. the batch is recorded *pending* in the ledger (committed): its files' keys are fixed;
2. in one transaction: its rows are locked (``FOR UPDATE SKIP LOCKED``; children through
   their keys, ``FOR UPDATE``) and deleted, children first (so no ON DELETE action finds
   any), returning exactly the versions deleted; those are written as one Parquet file per
   table, create-only; each file is read back (SHA-256, size and row count) and so is its
   manifest; only then is the batch marked *done* with its files, counted in the run log,
   and committed. Until that commit no other session sees a row gone.

Killed anywhere, every row is in the table or in exactly one file of a done batch: before
the commit nothing is deleted and the batch is still pending. The next run first redoes
pending batches under their own keys: an object that already holds exactly the rows is
reused (read back again), one that holds other rows (they changed) is replaced, and keys
of tables that now have no rows are cleared. Such an object never held the only copy of a
row. Files of done batches are never touched.

Given a second connection, batches overlap: while one batch's files are written, uploaded
and read back (Python and the object store), the next batch's rows are locked and deleted
on the other connection (the database). Each batch is still its own transaction, and
batches commit in order; a batch taken while the one before it fails is rolled back.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import UTC, datetime

import psycopg
from botocore.exceptions import BotoCoreError, ClientError
from psycopg import errors, sql

from .. import faults, parquet, pg
from ..api.retentionpolicy import RetentionPolicySpec
from ..errors import SpecError
from ..export import PARQUET_TYPE, ExportCounts, clear, instant, jsonable, place, write_manifest
from ..parquet import Mapped
from ..pg import export as sqle
from ..pg import retention as sqlr
from ..pg.retention import ChildPlan, Target
from ..progress import Progress
from ..retention import batch_pages, next_export_pages
from ..retention.planning import EXPLORING
from ..storage import ObjectStore, problem
from . import JobInput

log = logging.getLogger(__name__)

RETRIES = 10
RETRYABLE = (
    errors.LockNotAvailable,
    errors.QueryCanceled,
    errors.SerializationFailure,
    errors.DeadlockDetected,
    errors.ForeignKeyViolation,  # a child appeared after the snapshot under a parent being kept
)


@dataclass
class Taken:
    """A batch between its DELETE and its commit: its rows deleted (not yet committed), its files
    not yet written; ``tx`` holds its open transaction."""

    pending: sqle.PendingBatch
    conn: psycopg.Connection
    tx: contextlib.ExitStack
    root: sqle.Locked
    locked: dict[tuple[str, str], sqle.Locked]
    counts: dict[str, int]
    retried: bool
    last_page: int | None  # heap page of the last row the batch took (a plain table): where the next starts
    took: int  # rows of the table the batch's pages gave (rows below them through a self-reference not counted)


class GaveWay(RuntimeError):
    """A batch on the writer thread gave way at its commit (rolled back, still pending): run() redoes it."""

    def __init__(self, pending: sqle.PendingBatch) -> None:
        super().__init__(f"export batch {pending.id} gave way at its commit")
        self.pending = pending


def storage_failure(exc: BaseException, spec: RetentionPolicySpec) -> SpecError | None:
    """A storage failure as the spec field to fix (None: not a known one)."""
    found = problem(exc, spec.export_or_default.destination, "export.destination")
    if found is None:
        return None
    field, reason, message = found
    return SpecError(field, f"{message}; no row was deleted", reason=reason)


class Exporter:
    """One run's export batches over one table."""

    def __init__(
        self,
        conn: psycopg.Connection,
        job: JobInput,
        spec: RetentionPolicySpec,
        target: Target,
        store: ObjectStore,
        *,
        run_id: int | None,
        stop: threading.Event,
        deadline: float,
        progress: Progress | None = None,
        count: Callable[[int, dict[str, int]], None] | None = None,
        second: psycopg.Connection | None = None,
    ) -> None:
        self.conn = conn
        self.second = second  # a second session with the same settings: batches overlap (module docstring)
        self.job = job
        self.spec = spec
        self.target = target
        self.store = store
        self.run_id = run_id
        self.stop = stop
        self.deadline = deadline
        self.progress = progress
        self.count = count or (lambda rows, tables: None)
        self.state = job.state_schema
        self.counts = ExportCounts()
        self.destination = spec.export_or_default.destination.wire()
        self.tables: list[tuple[str, str]] = [(target.schema, target.table)]
        self.mapped: dict[tuple[str, str], list[Mapped]] = {}
        self.keys: dict[tuple[str, str], list[str]] = {}
        for name in [(target.schema, target.table), *(p.fk.child for p in target.plans() if p.effect == "archive")]:
            if name in self.mapped:
                continue
            if name not in self.tables:
                self.tables.append(name)
            self.mapped[name] = [parquet.arrow_type(c) for c in sqle.columns(conn, *name)]
            self.keys[name] = sqlr.primary_key(conn, *name)
        self.exported = 0  # batches of this run that exported rows
        # The number of each batch of this run that took rows, in the order taken (fault points name it;
        # with overlapping batches, commits lag takes): pending id -> number, kept across retakes.
        self.numbers: dict[int, int] = {}
        self.last_page: int | None = None  # heap page of the last row the last batch took (a plain table)

    # --- the run ---------------------------------------------------------------------------

    def point(self, name: str, number: int | None = None) -> None:
        """A fault-injection point, also numbered (``export-deleted@3``: in the third batch of this run that
        takes rows; before a batch has taken any, the number it would get)."""
        faults.checkpoint(name)
        faults.checkpoint(f"{name}@{number or len(self.numbers) + 1}")

    def number(self, pending: sqle.PendingBatch) -> int:
        """This batch's number among the batches of this run that took rows (given when it first does)."""
        return self.numbers.setdefault(pending.id, len(self.numbers) + 1)

    def redo_pending(self) -> None:
        """Batches a killed or failed run left pending: done now under their own keys, before any new one."""
        sqle.fold_tallies(self.conn, self.state)  # a killed run's last batch, if it died before folding
        for pending in sqle.pending_batches(self.conn, self.state, self.job.policy_key):
            if pending.partition is not None:
                if pg.table_columns(self.conn, *pending.partition) is None:  # dropped by hand meanwhile
                    clear(self.store, pending, set())
                    sqle.forget_batch(self.conn, self.state, pending.id)
                continue  # else a detached partition: finished by the partition path
            self.point("export-redo")
            self.counts.redone += 1
            self.batch(pending, retried=True)

    def run(self, cutoff: datetime) -> str | None:
        """Every matching row, walking the table's pages once; returns why it stopped early (None: done)."""
        self.redo_pending()
        end, density = sqlr.heap_extent(self.conn, self.target)
        rows_per_file = self.spec.export_or_default.rows_per_file
        pages, _ = batch_pages(rows_per_file, rows_per_file, density)
        largest = pages * EXPLORING
        lo = 0
        group = cutoff.astimezone(UTC).strftime("%Y-%m-%d")
        lanes = [self.conn, self.second] if self.second is not None else [self.conn]
        settling: Future[int] | None = None  # the batch before, being written and committed
        stopped: str | None = None
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="pgscale-export") as writer:
            try:
                turn = 0
                while lo < end:
                    if self.stop.is_set():
                        stopped = "stopped on request after a committed batch"
                        break
                    if time.monotonic() > self.deadline:
                        stopped = f"maxRunTime {self.spec.max_run_time} reached; next run continues"
                        break
                    conn = lanes[turn % len(lanes)]
                    turn += 1
                    if len(lanes) == 1 and settling is not None:
                        settling.result()  # one session: the batch before commits first
                        settling = None
                    hi = min(lo + pages, end)
                    pending = sqle.begin_batch(
                        conn,
                        self.state,
                        policy=self.job.policy_key,
                        group=group,
                        tables=self.tables,
                        run_id=self.run_id,
                        cutoff=cutoff,
                        lo=lo,
                        hi=hi,
                    )
                    self.point("export-pending")
                    taken = self._take_retrying(conn, pending, before=settling)
                    if settling is not None:
                        before, settling = settling, None
                        try:
                            before.result()  # batches commit in order
                        except GaveWay as gave:
                            # The batch before gave way at its commit: this one may hold rows it needs again.
                            # Let go of this one; both again, alone, on the main session.
                            if taken is not None:
                                self._abandon(taken)
                            self.batch(gave.pending, retried=True)
                            taken = self._take_retrying(self.conn, pending, retried=True) if taken else None
                            if taken is not None:
                                self.last_page = taken.last_page
                                moved = taken.took
                                self._settle_retrying(taken)
                            lo, pages = self._next_range(lo, hi, pages, moved if taken else 0, largest)
                            continue
                        except BaseException:
                            if taken is not None:
                                self._abandon(taken)
                            raise
                    moved = 0
                    if taken is not None:
                        moved = taken.took
                        self.last_page = taken.last_page
                        settling = writer.submit(self._settle_retrying, taken, alone=len(lanes) == 1)
                    lo, pages = self._next_range(lo, hi, pages, moved, largest)
            except BaseException:
                if settling is not None:  # never leave a batch half done; this failure is the run's
                    with contextlib.suppress(Exception):
                        settling.result()
                raise
            if settling is not None:
                try:
                    settling.result()  # its failure is the run's
                except GaveWay as gave:
                    self.batch(gave.pending, retried=True)  # the last batch: nothing else is in flight
        sqle.fold_after_commit(self.conn, self.state)  # a tally whose fold gave way after its commit
        return stopped

    def _next_range(self, lo: int, hi: int, pages: int, moved: int, largest: int) -> tuple[int, int]:
        """Where the walk goes after a batch of ``pages`` from ``lo`` that took ``moved`` rows."""
        rows_per_file = self.spec.export_or_default.rows_per_file
        if moved < rows_per_file:
            return hi, next_export_pages(pages, moved, rows_per_file, largest)
        if self.last_page is not None:
            # Full: the range holds more. The batch took the first rows in page order, so the next
            # one starts at the page of its last row, sized by what these pages held.
            return self.last_page, max(1, min(largest, self.last_page + 1 - lo))
        return lo, max(1, pages // 2)  # partitions: their pages interleave; the same range again, halved

    def batch(self, pending: sqle.PendingBatch, *, retried: bool = False) -> int:
        """One batch on the main session, retried when it gives way to the application; returns the rows it
        exported."""
        self.point("export-pending")
        taken = self._take_retrying(self.conn, pending, retried=retried)
        return 0 if taken is None else self._settle_retrying(taken)

    def _take_retrying(
        self,
        conn: psycopg.Connection,
        pending: sqle.PendingBatch,
        *,
        retried: bool = False,
        before: Future[int] | None = None,
    ) -> Taken | None:
        """``before``: the batch being settled on the other session. Rows it holds (below this batch's
        rows, or reached by another key) are no contention with the application: while it is in
        flight, a batch that gives way waits for it to end (however long its upload takes) and tries
        again, not counting that as a failure."""
        failures = 0
        while True:
            try:
                with self._storage(pending):
                    return self._take(conn, pending, retried=retried)
            except RETRYABLE as exc:
                retried = True  # its objects may exist now
                if before is not None and not before.done():
                    log.info("export batch %s waits for the batch before it (%s)", pending.id, type(exc).__name__)
                    wait([before])  # its failure is the run's: run() reads it next
                    continue
                failures = self._gave_way(pending, exc, failures)

    def _settle_retrying(self, taken: Taken, *, alone: bool = True) -> int:
        """Write, verify and commit a taken batch; when its commit gives way to the application, the whole
        batch again on the same session. Not ``alone`` (the next batch is taken on the other session and
        may hold rows this one needs again: retaking here could wait for it forever), ``GaveWay`` hands
        the retry to the walk, which lets the next batch go first."""
        with self._storage(taken.pending):
            try:
                return self._settle(taken)
            except RETRYABLE as exc:
                if not alone:
                    log.warning("export batch %s gave way at its commit (%s)", taken.pending.id, type(exc).__name__)
                    raise GaveWay(taken.pending) from exc
                failures = self._gave_way(taken.pending, exc, 0)
            while True:
                try:
                    again = self._take(taken.conn, taken.pending, retried=True)
                    return 0 if again is None else self._settle(again)
                except RETRYABLE as exc:
                    failures = self._gave_way(taken.pending, exc, failures)

    @contextlib.contextmanager
    def _storage(self, pending: sqle.PendingBatch) -> Iterator[None]:
        """Object-store failures as the spec field to fix (or a plain error naming the batch)."""
        try:
            yield
        except (BotoCoreError, ClientError, OSError) as exc:
            found = storage_failure(exc, self.spec)
            if found is not None:
                raise found from exc
            raise RuntimeError(f"writing the files of export batch {pending.id} failed: {exc}") from exc

    def _gave_way(self, pending: sqle.PendingBatch, exc: BaseException, failures: int) -> int:
        failures += 1
        if failures > RETRIES:
            raise exc
        log.warning("export batch %s gave way to the application (%s); retrying", pending.id, type(exc).__name__)
        self.stop.wait(0.05 * failures)
        return failures

    @staticmethod
    def _abandon(taken: Taken) -> None:
        """Roll back a taken batch (the one before it failed): its rows stay, it stays pending."""
        with contextlib.suppress(psycopg.Error):
            taken.tx.__exit__(RuntimeError, RuntimeError("abandoned"), None)

    def _take(self, conn: psycopg.Connection, pending: sqle.PendingBatch, *, retried: bool) -> Taken | None:
        """Lock and delete a batch's rows in a transaction left open (None: nothing to take; committed)."""
        target = self.target
        assert pending.cutoff is not None and pending.lo is not None and pending.hi is not None
        filters = dict(sqlr.predicate(target)[1])
        params = {"cutoff": pending.cutoff, **filters, "lo": pending.lo, "hi": pending.hi}
        root_name = (target.schema, target.table)
        tx = contextlib.ExitStack()
        tx.enter_context(conn.transaction())
        try:
            limit = self.spec.export_or_default.rows_per_file
            root = sqle.lock_root(conn, target, params, limit=limit)
            took = len(root.idents)
            last = None if target.partitioned or root.last is None else int(root.last.strip("()").split(",")[0])
            # Rows kept for their children, counted on the pages the walk leaves behind only (run()): a
            # full batch's next one starts on its last row's page (a partitioned table: the same range).
            counted = params
            if took >= limit:
                counted = {**params, "hi": pending.lo if last is None else max(pending.lo, last)}
            counts = sqle.count_kept(conn, target, counted) if counted["hi"] > counted["lo"] else {}
            self.point("export-locked", self.numbers.get(pending.id))
            if not root.idents:
                if retried:
                    clear(self.store, pending, set())
                sqle.forget_batch(conn, self.state, pending.id)
                tx.close()
                return None
            locked: dict[tuple[str, str], sqle.Locked] = {root_name: root}
            order: list[tuple[str, str]] = [root_name]
            scans: dict[tuple[str, str], tuple[sql.Composable, bool]] = {root_name: (target.scan, target.partitioned)}
            self._children(
                conn, target.children, target.scan, target.partitioned, root, root, locked, order, scans, counts
            )
            # Deleted children first (a table reached by several keys: before the first of them), so no
            # ON DELETE action finds one; the versions deleted are what the files hold. Nothing is
            # committed before every file is written and read back.
            for name in sorted(order, key=lambda n: max(i for i, o in enumerate(order) if o == n), reverse=True):
                rows = locked[name]
                scan, partitioned = scans[name]
                exported = name in self.mapped
                gone = sqle.delete_rows(
                    conn, scan, partitioned, rows, mapped=self.mapped[name] if exported else None, name=name
                )
                if gone != len(rows.idents):
                    raise RuntimeError(
                        f"deleted {gone} of the {len(rows.idents)} locked rows of {name[0]}.{name[1]}; "
                        "the batch is rolled back"
                    )
                if name != root_name:
                    label = f"{name[0]}.{name[1]} {'exported' if exported else 'deleted'}"
                    counts[label] = counts.get(label, 0) + gone
            self.point("export-deleted", self.number(pending))
        except BaseException as exc:
            tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return Taken(pending, conn, tx, root, locked, counts, retried, last, took)

    def _settle(self, taken: Taken) -> int:
        """A taken batch's files written and read back, then the batch done and committed."""
        pending, conn = taken.pending, taken.conn
        try:
            files = []
            for name in self.tables:
                held = taken.locked.get(name)
                if held is None or not held.idents:
                    continue
                files.append(self._write(pending, name, held, root=name == (self.target.schema, self.target.table)))
            if taken.retried:
                clear(self.store, pending, {f.object_key for f in files})
            self.point("export-verified", self.number(pending))
            sqle.finish_batch(
                conn,
                self.state,
                batch_id=pending.id,
                policy=self.job.policy_key,
                files=files,
                run_id=self.run_id,
                counts=taken.counts,
            )
            self.point("export-recorded", self.number(pending))
        except BaseException as exc:
            taken.tx.__exit__(type(exc), exc, exc.__traceback__)
            raise
        taken.tx.close()  # the commit
        self.point("export-committed", self.number(pending))
        sqle.fold_after_commit(conn, self.state)  # never raises: the batch is committed
        moved = len(taken.root.idents)
        self.exported += 1
        self.counts.files += len(files)
        self.count(moved, taken.counts)
        if self.progress:
            self.progress.advance(moved)
        return moved

    def _children(
        self,
        conn: psycopg.Connection,
        plans: tuple[ChildPlan, ...],
        parent_scan: sql.Composable,
        parent_partitioned: bool,
        parents: sqle.Locked,
        holder: sqle.Locked,
        locked: dict[tuple[str, str], sqle.Locked],
        order: list[tuple[str, str]],
        scans: dict[tuple[str, str], tuple[sql.Composable, bool]],
        counts: dict[str, int],
    ) -> None:
        """Lock the rows that reference ``parents`` (rows of a table whose batch rows ``holder`` holds) and
        go with them, recursively; count what the database's own SET NULL / SET DEFAULT will change.
        Through the table's references to itself, the rows below go too, into the same holder (and file)."""
        selfs = [p for p in plans if p.fk.self_reference and p.removes]
        if selfs:
            below = sqle.lock_descendants(conn, selfs, parent_scan, parent_partitioned, holder)
            if below and parents is not holder:
                parents = sqle.Locked(idents=[*parents.idents, *below])
        for plan in plans:
            label = f"{plan.fk.schema}.{plan.fk.table}"
            if plan.effect in ("setNull", "setDefault"):
                n = sqle.count_children(conn, plan, parent_scan, parent_partitioned, parents)
                if n:
                    counts[f"{label} {plan.effect}"] = counts.get(f"{label} {plan.effect}", 0) + n
                continue
            if not plan.removes or plan.fk.self_reference:
                continue  # skipParent: such parents were not taken; a self-reference: above
            name = plan.fk.child
            into = locked.setdefault(name, sqle.Locked())
            found = sqle.lock_children(conn, plan, parent_scan, parent_partitioned, parents, into)
            order.append(name)
            scans[name] = (plan.scan, plan.partitioned)
            if found and plan.children:
                self._children(
                    conn,
                    plan.children,
                    plan.scan,
                    plan.partitioned,
                    sqle.Locked(idents=found),
                    into,
                    locked,
                    order,
                    scans,
                    counts,
                )

    # --- files -----------------------------------------------------------------------------

    def _write(
        self, pending: sqle.PendingBatch, name: tuple[str, str], rows: sqle.Locked, *, root: bool
    ) -> sqle.FileRecord:
        """The table's rows of this batch as a verified file and manifest."""
        mapped = self.mapped[name]
        fingerprint = parquet.fingerprint(mapped)
        meta = {"source": f"{name[0]}.{name[1]}", "fingerprint": fingerprint, "batch": str(pending.id)}
        table = parquet.to_table(mapped, rows.rows, meta)
        data = parquet.write(table)
        sha = parquet.sha256(data)
        key = parquet.file_key(name[0], name[1], pending.group, pending.stem)
        names = [m.name for m in mapped]
        keys = self.keys[name]
        key_min = key_max = None
        if keys:
            idx = [names.index(k) for k in keys]
            key_min = [jsonable(rows.rows[0][i]) for i in idx]
            key_max = [jsonable(rows.rows[-1][i]) for i in idx]
        age_min = age_max = None
        age_column = self.target.age_column if root else None
        if age_column is not None:
            ages = [a for a in (instant(r[names.index(age_column)]) for r in rows.rows) if a is not None]
            age_min, age_max = (min(ages), max(ages)) if ages else (None, None)
        record = sqle.FileRecord(
            source_schema=name[0],
            source_table=name[1],
            root=root,
            object_key=key,
            manifest_key=parquet.manifest_key(key),
            location=self.store.location(key),
            destination=self.destination,
            rows=len(rows.rows),
            bytes=len(data),
            sha256=sha,
            fingerprint=fingerprint,
            row_bytes=rows.row_bytes,
            key_columns=keys,
            key_min=key_min,
            key_max=key_max,
            age_column=age_column,
            age_min=age_min,
            age_max=age_max,
            cutoff=pending.cutoff,
            partition_name=pending.partition[1] if pending.partition else None,
        )
        place(
            self.store,
            key,
            data,
            size=len(data),
            sha=sha,
            rows=len(rows.rows),
            content_type=PARQUET_TYPE,
            counts=self.counts,
        )
        self.point("export-written", self.number(pending))
        columns = [[m.name, m.column.type, str(m.arrow)] for m in mapped]
        write_manifest(
            self.store, record, policy=self.job.policy_key, batch=pending.id, columns=columns, counts=self.counts
        )
        self.point("export-manifest", self.number(pending))
        return record
