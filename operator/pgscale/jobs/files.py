"""`pgscale job file-migration`: move files out of a table, verifiably and resumably.

Per row, in one transaction with the few others its worker took (one claim and one
commit for the group): lock it (``FOR UPDATE SKIP LOCKED``), stream and decode its data
while hashing, write the object create-only with its SHA-256 checksum (the
server refuses other bytes; without the server's confirmation its size and SHA-256
are read back), point the row at it (from phase cutover on) and record it in the ledger.
Killing the job anywhere leaves either the old state or the new one for every
row; an object written by a killed attempt is found and reused by the next.
Only in phase dropSource is data nulled, only for rows whose object was verified
and that nobody changed since; the column is dropped only after a full pass that
reads every object back and finds its hash.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import queue
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import IO, Any

import psycopg
from botocore.exceptions import BotoCoreError, ClientError

from .. import pg
from ..api import FILE_MIGRATION
from ..api.filemigration import FileMigrationSpec
from ..checks import require_column, require_table
from ..errors import ReconcileError
from ..files import Base64Stream, Malformed, RateLimiter, object_key, source, versioned_key
from ..pg import files as sqlf
from ..progress import Progress
from ..quantity import parse_quantity
from ..storage import AlreadyExists, ObjectStore, open_store
from . import JobInput, start

log = logging.getLogger(__name__)

READ_CHUNK = 4 * 1024 * 1024  # bytes fetched per slice for large values; a file up to this is kept for the upload
INLINE = 1024 * 1024  # values up to this come with the claim of their row
SPOOL_MAX = 128 * 1024 * 1024  # stored size up to which a large file is decoded once, into a temporary file
ROWS_PER_TRANSACTION = 8  # rows claimed and committed together by a worker (at most batchSize)


@dataclass
class Report:
    """What a job run did (also printed as JSON)."""

    phase: str = "Copying"
    rows_migrated: int = 0
    rows_failed: int = 0
    rows_skipped_locked: int = 0
    rows_nulled: int = 0
    bytes_written: int = 0
    objects_reused: int = 0
    verified_objects: int = 0
    column_dropped: bool = False
    message: str = ""
    failures: list[dict[str, str]] = field(default_factory=list)


def make_store(spec: FileMigrationSpec, env: dict[str, str] | None = None) -> ObjectStore:
    """The destination, with credentials from the environment (the pod's Secret-backed env)."""
    return open_store(
        spec.destination,
        env,
        concurrency=spec.concurrency,
        part_size=parse_quantity(spec.multipart_chunk_size),
        multipart_threshold=parse_quantity(spec.multipart_threshold),
    )


def storage_type(spec: FileMigrationSpec) -> str:
    return "s3" if spec.destination.s3 is not None else "filesystem"


class Migration:
    """One job run over one table."""

    def __init__(
        self,
        job: JobInput,
        store: ObjectStore,
        *,
        stop: threading.Event | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.job = job
        self.spec = FileMigrationSpec.model_validate(job.spec)
        self.src = source(self.spec)
        self.store = store
        self.stop = stop or threading.Event()
        self.progress = progress
        self.report = Report()
        self.cutover = self.spec.phase in ("cutover", "dropSource")
        self.threshold = parse_quantity(self.spec.multipart_threshold)
        self.part_size = max(parse_quantity(self.spec.multipart_chunk_size), 5 * 1024 * 1024)  # as S3Store cuts
        rate = self.spec.rate_limit
        self.limiter = RateLimiter(
            rate.rows_per_second if rate else None,
            parse_quantity(rate.bytes_per_second) if rate and rate.bytes_per_second else None,
        )
        self._lock = threading.Lock()
        self.workers = self.spec.concurrency + max(1, self.spec.concurrency // 2)
        self._uploads = threading.BoundedSemaphore(self.spec.concurrency)
        self._read_back: set[str] = set()  # rows whose object this run downloaded and hashed

    # --- the run ----------------------------------------------------------------------

    def run(self) -> Report:
        with pg.connect(self.job.conn) as conn:
            sqlf.ensure_ledger(conn, self.job.state_schema)
            columns = require_table(conn, self.spec.table, privileges=("SELECT", "UPDATE"))
            require_column(columns, self.spec.key_column, "keyColumn", self.spec.table)
            if self.spec.data_column not in columns:
                self.report.phase, self.report.column_dropped = "Completed", True
                self.report.message = f"column {self.spec.data_column!r} is gone: the migration is complete"
                return self.report
            if self.cutover:
                added = sqlf.ensure_pointer_columns(conn, self.src, 5000)
                if added:
                    log.info("added columns %s", ", ".join(added))
            self.has_path = self.src.path in (pg.table_columns(conn, self.src.schema, self.src.table) or {})
            self.report.phase = "CuttingOver" if self.cutover else "Copying"
            self.report.rows_failed += sqlf.record_empty(
                conn, self.src, self.job.policy_key, self.job.state_schema, has_path=self.has_path
            )
            self._passes(conn)
            if self.spec.phase == "dropSource" and not self.stop.is_set():
                self.report.phase = "DroppingSource"
                self._null_sources(conn)
                if self.report.rows_nulled:
                    # Plain VACUUM: the freed space becomes reusable without blocking the application.
                    sqlf.vacuum(conn, self.src)
                if self.spec.drop_column and not self.stop.is_set():
                    self.report.phase = "Verifying"
                    self._verify_and_drop(conn)
            if not self.stop.is_set() and self.report.phase != "Verifying":
                self.report.phase = "Completed"
        return self.report

    def _passes(self, conn: psycopg.Connection) -> None:
        """Passes until one finds nothing to do: rows written meanwhile are caught by the next."""
        idle_passes = 0
        while not self.stop.is_set():
            total = sqlf.count_candidates(
                conn, self.src, self.job.policy_key, self.job.state_schema, cutover=self.cutover
            )
            if total == 0:
                return
            if self.progress:
                self.progress.start(total)
            done = self._pass(conn, total)
            if done == 0:  # every candidate locked by the application or failing: give it time
                idle_passes += 1
                if idle_passes >= 5:
                    self.report.message = f"{total} rows stayed locked or kept failing; the next run retries"
                    return
                self.stop.wait(min(2.0 * idle_passes, 10))
            else:
                idle_passes = 0

    def _pass(self, conn: psycopg.Connection, total: int) -> int:
        keys: queue.Queue[Any] = queue.Queue(maxsize=self.spec.batch_size)
        done = [0]
        errors: list[BaseException] = []

        group = max(1, min(self.spec.batch_size, ROWS_PER_TRANSACTION))

        def worker() -> None:
            with pg.connect(self.job.conn) as wconn:
                last = False
                while not last:
                    batch = [keys.get()]
                    while len(batch) < group and batch[-1] is not _END:  # whatever is queued, without waiting
                        try:
                            batch.append(keys.get_nowait())
                        except queue.Empty:
                            break
                    if batch[-1] is _END:
                        last = True
                        batch.pop()
                    if not batch or self.stop.is_set() or errors:
                        continue
                    try:
                        moved = self.migrate_batch(wconn, batch)
                        with self._lock:
                            done[0] += moved
                    except Exception as exc:  # storage or database trouble: stop this pass, report
                        log.exception("rows %r", batch)
                        errors.append(exc)

        # More workers than uploads: while `concurrency` of them write, the others claim, read and hash
        # their next rows, so the uploads in flight (at most `concurrency`, see _place) do not wait for them.
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.workers)]
        for t in threads:
            t.start()
        try:
            for key in sqlf.candidates(
                conn,
                self.src,
                self.job.policy_key,
                self.job.state_schema,
                cutover=self.cutover,
                batch=self.spec.batch_size,
            ):
                if self.stop.is_set() or errors:
                    break
                keys.put(key)
        finally:
            for _ in threads:
                keys.put(_END)
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        return done[0]

    # --- rows ------------------------------------------------------------------------------

    def migrate_batch(self, conn: psycopg.Connection, keys: list[Any]) -> int:
        """Upload, verify, point and record a few rows in one transaction; returns how many were done.

        The rows are locked together (skipping those someone else holds) and committed
        together with their ledger entries: one claim and one commit for the group instead
        of per row. A file over INLINE gets a transaction of its own afterwards (claimed
        again), so the other rows' locks do not wait for its upload. Killed before the
        commit, nothing of the group is recorded, and the objects already written are found
        and reused by the next run, as for a single row.
        """
        results: list[_Result] = []
        later: list[Any] = []  # larger files, each in a transaction of its own after this one
        with conn.transaction():
            claimed = sqlf.claim_many(
                conn,
                self.src,
                keys,
                has_path=self.has_path,
                small=INLINE,
                state_schema=self.job.state_schema,
                migration=self.job.policy_key,
            )
            for key, row, known in claimed:
                if self.stop.is_set():
                    break  # the rest of the group stays for the next run; this part commits
                if len(keys) > 1 and row.length is not None and row.length > INLINE:
                    later.append(key)  # its upload would keep the others' locks held meanwhile
                    continue
                result = self._migrate_claimed(conn, key, row, known)
                if result is not None:
                    results.append(result)
            sqlf.record_many(conn, self.job.state_schema, self.job.policy_key, [r.entry for r in results])
        with self._lock:
            self.report.rows_skipped_locked += len(keys) - len(claimed)
            for r in results:
                self.report.objects_reused += r.reused
                self.report.bytes_written += r.written
                if r.entry.status == "failed":
                    self.report.rows_failed += 1
                    if len(self.report.failures) < 20:
                        self.report.failures.append({"key": r.entry.key, "reason": r.entry.reason or ""})
                else:
                    self.report.rows_migrated += 1
        if self.progress:
            self.progress.advance(sum(r.entry.status != "failed" for r in results))
        return len(results) + sum(self.migrate_batch(conn, [key]) for key in later if not self.stop.is_set())

    def _migrate_claimed(
        self, conn: psycopg.Connection, key: Any, claimed: sqlf.Claimed, known: sqlf.Entry | None
    ) -> _Result | None:
        """One locked row: its ledger entry to record, or None when it has no data any more."""
        key_text = str(key)
        if claimed.length is None:  # nulled meanwhile: nothing to migrate
            return None
        # A large file is decoded once: to a temporary file while it is hashed, unless it is
        # probably uploaded already (a ledger entry with an object) or too large for the disk.
        spool = claimed.length <= SPOOL_MAX and (known is None or not known.object_key)
        try:
            sha, size, media, body = self._hash(conn, key, claimed.length, claimed.data, spool=spool)
        except Malformed as exc:
            return _Result(sqlf.Entry(key_text, None, None, None, "failed", claimed.xmin, str(exc)))
        try:
            return self._upload_claimed(
                conn, key, claimed=claimed, known=known, sha=sha, size=size, media=media, body=body
            )
        finally:
            if body is not None and not isinstance(body, bytes):
                body.close()

    def _upload_claimed(
        self,
        conn: psycopg.Connection,
        key: Any,
        *,
        claimed: sqlf.Claimed,
        known: sqlf.Entry | None,
        sha: str,
        size: int,
        media: str | None,
        body: Body,
    ) -> _Result:
        """Check, write and point one hashed row; its ledger entry to record."""
        key_text = str(key)
        if self.src.size and claimed.size is not None and int(claimed.size) != size:
            reason = f"size column {self.src.size!r} says {claimed.size} bytes, the data has {size}"
            return _Result(sqlf.Entry(key_text, None, None, None, "failed", claimed.xmin, reason))
        result = _Result(sqlf.Entry(key_text, None, size, sha, "verified", claimed.xmin))
        if known is not None and known.sha256 == sha and known.object_key and self._still_there(known):
            target = known.object_key  # written and verified before (e.g. in phase copy): not sent again
            result.reused = 1
        else:
            self.limiter.acquire(size)
            generic = claimed.content_type in (None, "", "application/octet-stream")
            content_type = (media or claimed.content_type) if generic else claimed.content_type
            target = self._place(conn, key, sha, size, content_type, body, result)
        path = target if self.spec.destination.s3 is None else (self.spec.destination.s3.prefix + target)
        xmin, status = claimed.xmin, "verified"
        if self.cutover:
            xmin, status = sqlf.set_pointer(conn, self.src, key, path, storage_type(self.spec)), "cutover"
        result.entry = sqlf.Entry(key_text, target, size, sha, status, xmin)
        return result

    def _still_there(self, known: sqlf.Entry) -> bool:
        found = self.store.head(known.object_key or "")
        return found is not None and found.sha256 == known.sha256 and found.size == known.size

    def _chunks(
        self, conn: psycopg.Connection, key: Any, found: dict[str, str | None] | None = None, value: Any = None
    ) -> Iterator[bytes]:
        """The decoded file, slice by slice (Malformed when it cannot be decoded); `value`: the
        stored value when the claim brought it along, else it is read in slices."""
        raw: Iterable[Any] = (
            [value]
            if value is not None
            else sqlf.read_chunks(conn, self.src, key, READ_CHUNK, text=self.spec.encoding != "bytea")
        )
        if self.spec.encoding == "bytea":
            yield from raw
            return
        stream = Base64Stream()
        for text in raw:
            yield stream.feed(text)
        stream.close()
        if found is not None:
            found["media"] = stream.media_type

    def _hash(
        self, conn: psycopg.Connection, key: Any, length: int, value: Any, *, spool: bool
    ) -> tuple[str, int, str | None, Body]:
        """SHA-256, size and media type of the decoded file, and what to upload: a small file kept in
        memory, a larger one in a temporary file (`spool`), or None: read and decode it again."""
        digest, size = hashlib.sha256(), 0
        found: dict[str, str | None] = {}
        keep: list[bytes] | None = [] if length <= READ_CHUNK else None
        out = tempfile.TemporaryFile() if keep is None and spool else None  # noqa: SIM115 - the caller closes it
        try:
            for chunk in self._chunks(conn, key, found, value):
                digest.update(chunk)
                size += len(chunk)
                if keep is not None:
                    keep.append(chunk)
                elif out is not None:
                    out.write(chunk)
        except BaseException:
            if out is not None:
                out.close()
            raise
        body: Body = b"".join(keep) if keep is not None else out
        return digest.hexdigest(), size, found.get("media"), body

    def _place(
        self,
        conn: psycopg.Connection,
        key: Any,
        sha: str,
        size: int,
        content_type: str | None,
        body: Body,
        result: _Result,
    ) -> str:
        """Write the object create-only (or find it already there) and make sure it holds these bytes.

        The write is tried first: create-only means it can only fail, never replace. A write the
        server confirmed by its SHA-256 checksum is done; otherwise (an existing object, or a
        server that does not check checksums) its size and hash are read back. Returns the key
        the verified object has.
        """
        base = object_key(self.spec.key_template, schema=self.src.schema, table=self.src.table, key=key)
        for candidate in (base, versioned_key(base, sha)):
            chunks: Iterable[bytes]
            if isinstance(body, bytes):
                chunks = [body]
            elif body is not None:
                chunks = _read_file(body, self.part_size)
            else:
                chunks = self._chunks(conn, key)
            try:
                with self._uploads:
                    confirmed = self.store.put_new(candidate, chunks, size=size, sha256=sha, content_type=content_type)
                result.written += size
                if confirmed:  # the server hashed what it received and it matched: no read-back needed
                    return candidate
                reused = False
            except AlreadyExists:
                reused = True  # an earlier attempt, or other content under this key: look at it
            found = self.store.head(candidate)
            if found is not None and found.sha256 == sha and found.size == size:
                result.reused += reused
                return candidate
            if not reused:
                raise RuntimeError(
                    f"object {candidate!r} of row {key!r} reads back as {found}, not {size} bytes "
                    f"with sha256 {sha}; the row is unchanged"
                )
            # Different content under this key (the row changed after an earlier upload): next key.
        raise RuntimeError(f"row {key!r}: both {base!r} and its versioned key hold other content; nothing changed")

    # --- dropSource ----------------------------------------------------------------------

    def _null_sources(self, conn: psycopg.Connection) -> None:
        """NULL the data of rows whose object is verified and that nobody changed since."""
        with pg.connect(self.job.conn) as wconn:
            for key in sqlf.cutover_keys(conn, self.src, self.job.policy_key, self.job.state_schema):
                if self.stop.is_set():
                    return
                with wconn.transaction():
                    claimed = sqlf.claim(wconn, self.src, key, has_path=True)
                    item = sqlf.entry(wconn, self.job.state_schema, self.job.policy_key, str(key))
                    if claimed is None or item is None or item.status != "cutover" or item.row_xmin != claimed.xmin:
                        continue
                    # The stored bytes are read back and hashed before the only other copy goes.
                    found = self.store.read_hash(item.object_key or "")
                    if found.sha256 != item.sha256 or found.size != item.size:
                        raise RuntimeError(
                            f"object {item.object_key!r} of row {key!r} reads back as {found.size} bytes / "
                            f"sha256 {found.sha256}, not {item.size} / {item.sha256}; its data is kept"
                        )
                    xmin = sqlf.null_source(wconn, self.src, key, claimed.xmin)
                    if xmin is None:
                        continue
                    sqlf.record(
                        wconn,
                        self.job.state_schema,
                        self.job.policy_key,
                        str(key),
                        status="nulled",
                        row_xmin=xmin,
                        object_key=item.object_key,
                        size=item.size,
                        sha256=item.sha256,
                    )
                self.report.rows_nulled += 1
                self._read_back.add(str(key))

    def _path_of(self, target: str | None) -> str | None:
        if target is None or self.spec.destination.s3 is None:
            return target
        return self.spec.destination.s3.prefix + target

    def _verify_and_drop(self, conn: psycopg.Connection) -> None:
        """Guard the column, read every object back, and only then drop the column.

        The guard (CHECK data IS NULL) first makes new data impossible and proves no
        row holds any; nothing can reach the column between this check and the drop.
        """
        remaining = sqlf.rows_with_data(conn, self.src)
        if remaining or not sqlf.guard_data_column(conn, self.src, 5000):
            self.report.message = (
                f"{remaining or 'some'} rows still hold data (failed or changed rows); the column stays"
            )
            return
        bad = []
        for key, path, target, size, sha, status in sqlf.verification_set(
            conn, self.src, self.job.policy_key, self.job.state_schema
        ):
            if status != "nulled" or path != self._path_of(target):
                continue  # no data was ever nulled by us here: the column holds nothing of this row
            if key in self._read_back:
                self.report.verified_objects += 1  # downloaded and hashed just before its data was nulled
                continue
            info = self.store.read_hash(target)
            if info.size != size or info.sha256 != sha:
                bad.append(
                    f"{key}: object {target!r} has {info.size} bytes / sha256 {info.sha256}, expected {size} / {sha}"
                )
            self.report.verified_objects += 1
            if len(bad) >= 20:
                break
        if bad:
            sqlf.unguard_data_column(conn, self.src)  # the column stays, so the application may use it again
            self.report.message = f"verification failed for {len(bad)} rows; the column stays: {'; '.join(bad[:5])}"
            raise RuntimeError(self.report.message)
        sqlf.drop_data_column(conn, self.src, 5000)
        self.report.column_dropped = True
        self.report.phase = "Completed"
        self.report.message = (
            f"verified {self.report.verified_objects} objects, dropped column {self.spec.data_column!r}; "
            "run VACUUM FULL or pg_repack to return its space to the operating system"
        )


def dry_run(job: JobInput, spec: FileMigrationSpec) -> int:
    """What a run would do: rows and stored bytes still to migrate; nothing is written."""
    src = source(spec)
    with pg.connect(job.conn) as conn:
        if spec.data_column not in (pg.table_columns(conn, src.schema, src.table) or {}):
            print(json.dumps({"outcome": "DryRun", "rows_pending": 0, "message": "the data column is gone"}))
            return 0
        sqlf.ensure_ledger(conn, job.state_schema)
        cutover = spec.phase in ("cutover", "dropSource")
        rows = sqlf.count_candidates(conn, src, job.policy_key, job.state_schema, cutover=cutover)
        stored = sqlf.pending_bytes(conn, src, job.policy_key, job.state_schema, cutover=cutover)
    print(
        json.dumps(
            {
                "outcome": "DryRun",
                "rows_pending": rows,
                "stored_bytes_pending": stored,
                "phase": spec.phase,
                "destination": make_store(spec).location(""),
            }
        )
    )
    return 0


class _End:
    pass


Body = bytes | IO[bytes] | None  # a file to upload: in memory, in a temporary file, or to read again


def _read_file(f: IO[bytes], size: int) -> Iterator[bytes]:
    f.seek(0)
    while chunk := f.read(size):
        yield chunk


@dataclass
class _Result:
    """What became of one row in a group: its ledger entry, and what it added to the report."""

    entry: sqlf.Entry
    reused: int = 0
    written: int = 0


_END = _End()


def main(args: argparse.Namespace) -> int:
    """Entry point of `pgscale job file-migration`."""
    begun = start(FILE_MIGRATION, "file-migration", args.namespace, args.name)
    if begun is None:
        return 2
    job, stop = begun
    spec = FileMigrationSpec.model_validate(job.spec)
    if args.dry_run:
        return dry_run(job, spec)
    progress = Progress("file-migration", stream=sys.stderr, unit="files")
    migration = Migration(job, make_store(spec), stop=stop, progress=progress)
    started = time.monotonic()
    try:
        report = migration.run()
    except (psycopg.Error, RuntimeError, OSError, ValueError, ReconcileError, BotoCoreError, ClientError) as exc:
        report = migration.report
        report.message = f"{type(exc).__name__}: {exc}"
        progress.finish("Failed")
        print(json.dumps({**asdict(report), "outcome": "Failed"}))
        return 1
    progress.finish(report.phase)
    print(json.dumps({**asdict(report), "outcome": "Succeeded", "seconds": round(time.monotonic() - started, 2)}))
    return 0
