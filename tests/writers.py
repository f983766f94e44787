"""Concurrent application writers for conversion and split tests and benchmarks: they record what committed."""

from __future__ import annotations

import random
import threading
import time
import uuid
from typing import Any

import psycopg

COLUMNS = 'id, title, status, "userId", "createdAt", "completedAt"'


def rows(conn: psycopg.Connection) -> dict[int, tuple[Any, ...]]:
    return {r[0]: r for r in conn.execute(f'SELECT {COLUMNS} FROM "Task"').fetchall()}


def fingerprint(conn: psycopg.Connection) -> tuple[int, str]:
    row = conn.execute(f"SELECT count(*), md5(string_agg(md5(ROW({COLUMNS})::text), '' ORDER BY id)) FROM \"Task\"")
    got = row.fetchone()
    assert got is not None
    return int(got[0]), str(got[1])


class Writer(threading.Thread):
    """The application: inserts (now and back-dated), updates and deletes, recording what committed."""

    def __init__(self, dsn: str, ids: list[int]) -> None:
        super().__init__(daemon=True)
        self.dsn, self.ids = dsn, list(ids)
        self.changes: dict[int, tuple[Any, ...] | None] = {}
        self.stop = threading.Event()
        self.ops = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []

    def run(self) -> None:
        rnd = random.Random(7)
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            while not self.stop.is_set():
                op = rnd.random()
                started = time.monotonic()
                try:
                    if op < 0.4:
                        back = rnd.choice([0, 0, 3, 40, 200])
                        row = conn.execute(
                            f"""INSERT INTO "Task" (title, status, "createdAt") VALUES (%s, 'PENDING',
                                now() - make_interval(days => %s)) RETURNING {COLUMNS}""",
                            (f"new {self.ops}", back),
                        ).fetchone()
                        assert row is not None
                        self.ids.append(row[0])
                        self.changes[row[0]] = row
                    elif op < 0.9:
                        victim = rnd.choice(self.ids)
                        row = conn.execute(
                            f"""UPDATE "Task" SET title = title || '+', status = CASE status WHEN 'PENDING'
                                THEN 'COMPLETED' ELSE 'PENDING' END WHERE id = %s RETURNING {COLUMNS}""",
                            (victim,),
                        ).fetchone()
                        if row is not None:
                            self.changes[victim] = row
                    else:
                        victim = rnd.choice(self.ids)
                        if conn.execute('DELETE FROM "Task" WHERE id = %s', (victim,)).rowcount:
                            self.changes[victim] = None
                except psycopg.Error as exc:  # any error the application would see is a failure of pgscale
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                self.latencies.append(time.monotonic() - started)
                self.ops += 1


def expected(before: dict[int, tuple[Any, ...]], writer: Writer) -> dict[int, tuple[Any, ...]]:
    out = dict(before)
    for key, row in writer.changes.items():
        if row is None:
            out.pop(key, None)
        else:
            out[key] = row
    return out


def assert_nothing_lost(conn: psycopg.Connection, before: dict[int, tuple[Any, ...]], writer: Writer) -> None:
    """The stopped writer met no error, and the table holds exactly the rows it started with and committed."""
    assert not writer.errors, writer.errors[:5]
    got, want = rows(conn), expected(before, writer)
    assert len(got) == len(want) and got == want


# --- DatabaseSplit: the sample app's messages, written to whichever database takes writes ---------------


def messages(conn: psycopg.Connection) -> dict[int, str]:
    return dict(conn.execute('SELECT id, body FROM "Message"').fetchall())


class MessageWriter(threading.Thread):
    """The application: inserts and updates messages on whichever database takes writes, following a
    read-only refusal to the other (as it would follow the published Secret), and keeps its own record."""

    def __init__(self, dsns: dict[str, str], record: dict[int, str]) -> None:
        super().__init__(daemon=True)
        self.dsns = dsns
        self.route = "source"
        self.record = record
        self.stop = threading.Event()
        self.longest = 0.0
        self.writes = 0
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def flip(self) -> None:
        self.route = "target" if self.route == "source" else "source"

    def run(self) -> None:
        rng = random.Random(7)
        conn = psycopg.connect(self.dsns[self.route], autocommit=True)
        route = self.route
        while not self.stop.is_set():
            with self.lock:  # held by the test to compare both sides: not counted as a block
                started = time.monotonic()
                body = f"m{self.writes}-{uuid.uuid4().hex[:6]}"
                while not self.stop.is_set():
                    if route != self.route:
                        conn.close()
                        conn = psycopg.connect(self.dsns[self.route], autocommit=True)
                        route = self.route
                    try:
                        self.write(conn, rng, body)
                        break
                    except psycopg.errors.ReadOnlySqlTransaction:
                        self.flip()
                        time.sleep(0.002)
                    except psycopg.errors.UniqueViolation as exc:
                        self.errors.append(str(exc))
                        break
                self.longest = max(self.longest, time.monotonic() - started)
                self.writes += 1
            time.sleep(0.002)
        conn.close()

    def write(self, conn: psycopg.Connection, rng: random.Random, body: str) -> None:
        if self.record and rng.random() < 0.4:
            key = rng.choice(list(self.record))
            conn.execute('UPDATE "Message" SET body = %s WHERE id = %s', (body, key))
        else:
            row = conn.execute('INSERT INTO "Message" (body, "taskId") VALUES (%s, 1) RETURNING id', (body,)).fetchone()
            assert row is not None
            key = row[0]
            if key in self.record:
                self.errors.append(f"id {key} given twice")
        self.record[key] = body

    def caught_up(self, a: psycopg.Connection, b: psycopg.Connection, what: str) -> None:
        """Pause the writes until both sides hold the same rows."""
        with self.lock:
            until(what, lambda: messages(a) == messages(b))


def until(what: str, check: Any, timeout: float = 90) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")
