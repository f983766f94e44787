"""FileMigration against a real PostgreSQL and a real S3-compatible server (moto)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import random
import signal
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest

from conftest import scalar, start_container
from pgscale.api.databaseprofile import DatabaseProfileSpec
from pgscale.jobs import JobInput
from pgscale.jobs.files import Migration, make_store
from pgscale.kube import ObjectRef
from pgscale.pg.connection import ConnInfo
from pgscale.specs import builders
from pgscale.storage import ChecksumMismatch, ObjectInfo, S3Store, s3_client

pytestmark = [pytest.mark.postgres, pytest.mark.s3]
MiB = 1024 * 1024


@pytest.fixture
def bucket(s3_server: Any) -> str:
    name = f"files-{uuid.uuid4().hex[:8]}"
    client(s3_server).create_bucket(Bucket=name)
    return name


def client(s3: Any) -> Any:
    return s3_client(s3.endpoint, "us-east-1", s3.ACCESS_KEY, s3.SECRET_KEY, True)


def spec_for(s3: Any, bucket: str, **extra: Any) -> dict[str, Any]:
    endpoint = s3.endpoint if s3 is not None else "http://unused:9000"
    return {
        "profileRef": {"name": "app"},
        "table": {"name": "File"},
        "keyColumn": "id",
        "dataColumn": "data",
        "encoding": "base64",
        "columns": {"fileName": "fileName", "contentType": "mimeType", "size": "size"},
        "destination": {"s3": {"bucket": bucket, "prefix": "files/", "endpoint": endpoint}},
        "batchSize": 10,
        "concurrency": 4,
        "multipartThreshold": "5Mi",
        "multipartChunkSize": "5Mi",
        **extra,
    }


def job(postgres: Any, database: str, spec: dict[str, Any]) -> JobInput:
    conn = ConnInfo(
        host=postgres.host, port=postgres.port, dbname=database, user="postgres", password=postgres.PASSWORD
    )
    return JobInput("ns", "files-to-s3", spec, "pgscale", conn)


def migrate(postgres: Any, database: str, s3: Any, spec: dict[str, Any]) -> Any:
    env = {"AWS_ACCESS_KEY_ID": s3.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3.SECRET_KEY}
    from pgscale.api.filemigration import FileMigrationSpec

    store = make_store(FileMigrationSpec.model_validate(spec), env)
    return Migration(job(postgres, database, spec), store).run()


def seed_files(conn: psycopg.Connection, sizes: list[int]) -> dict[str, bytes]:
    """Files with random content; returns id -> original bytes."""
    originals = {}
    with conn.cursor() as cur:
        for i, size in enumerate(sizes):
            payload = random.Random(i).randbytes(size)
            key = f"f{i:04d}"
            originals[key] = payload
            cur.execute(
                'INSERT INTO "File" (id, "fileName", "mimeType", size, data) VALUES (%s, %s, %s, %s, %s)',
                (key, f"Bericht-{i}-äöü-日本.pdf", "application/pdf", size, base64.b64encode(payload).decode()),
            )
    return originals


def object_sha(s3: Any, bucket: str, key: str) -> str:
    body = client(s3).get_object(Bucket=bucket, Key=key)["Body"].read()
    return hashlib.sha256(body).hexdigest()


def test_copy_then_cutover_then_drop_source(postgres: Any, database: str, s3_server: Any, bucket: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        sizes = [0, 1, 2, 3, 100, 4096, 65536, 12 * MiB + 7] + [
            random.Random(s).randint(10, 200_000) for s in range(40)
        ]
        originals = seed_files(conn, sizes)
        # copy: objects written and verified, the table untouched
        report = migrate(postgres, database, s3_server, spec_for(s3_server, bucket))
        assert report.rows_migrated == len(originals) and report.rows_failed == 0 and report.phase == "Completed"
        assert scalar(conn, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'filePath'") == 0
        for key, payload in originals.items():
            assert object_sha(s3_server, bucket, f"files/File/{key}") == hashlib.sha256(payload).hexdigest()
        # cutover: rows point at their objects (uploads are reused, not repeated)
        report = migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="cutover"))
        assert report.rows_migrated == len(originals) and report.bytes_written == 0
        assert report.objects_reused == len(originals)
        rows = conn.execute('SELECT id, "filePath", "storageType", data IS NOT NULL FROM "File"').fetchall()
        assert all(r[1] == f"files/File/{r[0]}" and r[2] == "s3" and r[3] for r in rows)
        # dropSource: data nulled, verified again, column dropped at the very end
        report = migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="dropSource"))
        assert report.rows_nulled == len(originals) and report.verified_objects == len(originals)
        assert report.column_dropped and report.phase == "Completed"
        assert (
            scalar(
                conn,
                """SELECT count(*) FROM information_schema.columns
                               WHERE table_name = 'File' AND column_name = 'data'""",
            )
            == 0
        )
        big = client(s3_server).head_object(Bucket=bucket, Key="files/File/f0007")
        assert big["ContentLength"] == 12 * MiB + 7 and "-" in big["ETag"]  # a multipart upload


def test_bad_rows_are_recorded_and_never_block(postgres: Any, database: str, s3_server: Any, bucket: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        originals = seed_files(conn, [10, 20, 30])
        data_url = "data:image/png;base64," + base64.b64encode(b"png!").decode()
        conn.execute(
            """INSERT INTO "File" (id, "fileName", size, data) VALUES
            ('bad-b64', 'x', 3, 'not base64!'), ('null-data', 'y', NULL, NULL),
            ('wrong-size', 'z', 999, %s), ('data-url', 'p.png', 4, %s)""",
            (base64.b64encode(b"abc").decode(), data_url),
        )
        report = migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="dropSource"))
        reasons = {f["key"]: f["reason"] for f in report.failures}
        assert set(reasons) == {"bad-b64", "wrong-size"} and report.rows_failed == 3  # and null-data
        assert "invalid Base64" in reasons["bad-b64"] and "says 999 bytes, the data has 3" in reasons["wrong-size"]
        assert report.rows_migrated == len(originals) + 1  # data-url decoded
        assert not report.column_dropped and "still hold data" in report.message
        head = client(s3_server).head_object(Bucket=bucket, Key="files/File/data-url")
        assert head["ContentType"] == "image/png"
        ledger: dict[str, str] = dict(
            conn.execute("SELECT key, status FROM pgscale.file_ledger WHERE status = 'failed'").fetchall()
        )
        assert set(ledger) == {"bad-b64", "wrong-size", "null-data"}
        # The bad rows keep their data untouched.
        assert scalar(conn, """SELECT data FROM "File" WHERE id = 'bad-b64'""") == "not base64!"


def test_changed_row_is_uploaded_again_without_overwriting(
    postgres: Any, database: str, s3_server: Any, bucket: str
) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_files(conn, [100])
        migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="cutover"))
        first = object_sha(s3_server, bucket, "files/File/f0000")
        new = b"new content"
        conn.execute(
            """UPDATE "File" SET data = %s, size = %s WHERE id = 'f0000'""", (base64.b64encode(new).decode(), len(new))
        )
        report = migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="cutover"))
        assert report.rows_migrated == 1
        path = scalar(conn, """SELECT "filePath" FROM "File" WHERE id = 'f0000'""")
        assert path.startswith("files/File/f0000~")
        assert object_sha(s3_server, bucket, path) == hashlib.sha256(new).hexdigest()
        assert object_sha(s3_server, bucket, "files/File/f0000") == first  # the old object is untouched


def check_invariants(conn: psycopg.Connection, s3: Any, bucket: str, originals: dict[str, bytes]) -> None:
    """No file lost, none corrupted, no row pointing at a missing object.

    A row that still has data holds the latest version; its pointer may lag behind an
    application update until the next run (the old object must still exist). A row
    without data must point at an object holding exactly its latest version.
    """
    columns = {
        r[0] for r in conn.execute("SELECT column_name FROM information_schema.columns WHERE table_name = 'File'")
    }
    data_col = "data" if "data" in columns else "NULL"
    path_col = '"filePath"' if "filePath" in columns else "NULL"
    for key, path, data in conn.execute(f'SELECT id, {path_col}, {data_col} FROM "File" ORDER BY id').fetchall():
        want = hashlib.sha256(originals[key]).hexdigest()
        if data is not None:
            assert hashlib.sha256(base64.b64decode(data)).hexdigest() == want, key
            if path is not None:
                client(s3).head_object(Bucket=bucket, Key=path)  # exists
        else:
            assert path is not None, f"{key}: no data and no object"
            assert object_sha(s3, bucket, path) == want, key


def test_killed_at_random_points_and_rerun_until_done(
    postgres: Any, database: str, s3_server: Any, bucket: str
) -> None:
    """SIGKILL the job, as its pod runs it, at 12 random moments; rerun until it completes."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        sizes = [random.Random(100 + i).choice([100, 5000, 80_000, 300_000]) for i in range(320)] + [6 * MiB]
        originals = seed_files(conn, sizes)
        # 40 rows/s: the run lasts long enough to be interrupted at many points.
        spec = spec_for(s3_server, bucket, phase="dropSource", concurrency=3, rateLimit={"rowsPerSecond": 40})
        owner = ObjectRef("pgscale.io/v1alpha1", "FileMigration", "ns", "files-to-s3", "uid")
        profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}})
        pod = {
            "containers": [
                {
                    "args": builders.job_args("file-migration", owner),
                    "env": [
                        *builders.job_env(owner, spec, profile),
                        {"name": "AWS_ACCESS_KEY_ID", "value": s3_server.ACCESS_KEY},
                        {"name": "AWS_SECRET_ACCESS_KEY", "value": s3_server.SECRET_KEY},
                    ],
                }
            ]
        }
        secrets = {"app-db": {"uri": postgres.uri(database)}}
        rng = random.Random(2026)
        kills = 0
        for _ in range(40):
            proc = start_container(pod, secrets)
            if kills < 12:
                time.sleep(rng.uniform(0.4, 1.2))
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    kills += 1
                    check_invariants(conn, s3_server, bucket, originals)
                    continue
            out, _ = proc.communicate(timeout=300)
            last = json.loads(out.strip().splitlines()[-1])
            if last["outcome"] == "Succeeded" and last["column_dropped"]:
                break
        assert kills >= 10
        assert (
            scalar(
                conn,
                """SELECT count(*) FROM information_schema.columns
                               WHERE table_name = 'File' AND column_name = 'data'""",
            )
            == 0
        )
        for key, path in conn.execute('SELECT id, "filePath" FROM "File"').fetchall():
            assert object_sha(s3_server, bucket, path) == hashlib.sha256(originals[key]).hexdigest()


def test_application_writes_during_migration(postgres: Any, database: str, s3_server: Any, bucket: str) -> None:
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        originals = seed_files(conn, [random.Random(i).randint(100, 50_000) for i in range(200)])
        stop = threading.Event()
        lock = threading.Lock()

        def app() -> None:
            rng = random.Random(9)
            with psycopg.connect(postgres.dsn(database), autocommit=True) as w:
                n = 0
                while not stop.is_set() and n < 400:
                    n += 1
                    payload = rng.randbytes(rng.randint(10, 20_000))
                    if rng.random() < 0.5:
                        key = f"new{n:04d}"
                        w.execute(
                            'INSERT INTO "File" (id, "fileName", size, data) VALUES (%s, %s, %s, %s)',
                            (key, "n", len(payload), base64.b64encode(payload).decode()),
                        )
                    else:
                        key = f"f{rng.randrange(200):04d}"
                        w.execute(
                            'UPDATE "File" SET data = %s, size = %s WHERE id = %s AND data IS NOT NULL',
                            (base64.b64encode(payload).decode(), len(payload), key),
                        )
                    with lock:
                        originals[key] = payload
                    time.sleep(0.002)

        writer = threading.Thread(target=app)
        writer.start()
        migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="cutover"))
        stop.set()
        writer.join()
        check_invariants(conn, s3_server, bucket, originals)
        # Whatever the application wrote after its row was done is caught by the next run.
        migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="dropSource"))
        check_invariants(conn, s3_server, bucket, originals)
        assert (
            scalar(
                conn,
                """SELECT count(*) FROM information_schema.columns
                               WHERE table_name = 'File' AND column_name = 'data'""",
            )
            == 0
        )


def test_filesystem_destination(postgres: Any, database: str, tmp_path: Any) -> None:
    """A volume instead of a bucket: create-only files with their SHA-256, the same phases."""
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        originals = seed_files(conn, [0, 10, 70_000, 6 * MiB])
        spec = {
            **spec_for(None, "unused", phase="dropSource"),
            "destination": {"filesystem": {"claimName": "files", "path": "uploads/"}},
        }
        from pgscale.api.filemigration import FileMigrationSpec

        store = make_store(FileMigrationSpec.model_validate(spec), {"PGSCALE_FS_ROOT": str(tmp_path)})
        report = Migration(job(postgres, database, spec), store).run()
        assert report.rows_migrated == 4 and report.column_dropped
        for key, path, kind in conn.execute('SELECT id, "filePath", "storageType" FROM "File"').fetchall():
            assert kind == "filesystem" and path == f"File/{key}"
            assert (tmp_path / "uploads" / path).read_bytes() == originals[key]
        assert not list(tmp_path.rglob(".pgscale-*"))  # no temporary files left behind


def test_corrupted_object_is_caught_before_the_data_goes(
    postgres: Any, database: str, s3_server: Any, bucket: str
) -> None:
    from pgscale.jobs.files import Migration as M

    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        originals = seed_files(conn, [1000, 2000])
        migrate(postgres, database, s3_server, spec_for(s3_server, bucket, phase="cutover"))
        # Someone (or a faulty store) replaces the bytes but keeps the metadata pgscale wrote.
        s3 = client(s3_server)
        meta = s3.head_object(Bucket=bucket, Key="files/File/f0000")["Metadata"]
        s3.put_object(Bucket=bucket, Key="files/File/f0000", Body=b"x" * 1000, Metadata=meta)
        with pytest.raises(RuntimeError, match="reads back as 1000 bytes"):
            env = {"AWS_ACCESS_KEY_ID": s3_server.ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": s3_server.SECRET_KEY}
            from pgscale.api.filemigration import FileMigrationSpec

            spec = spec_for(s3_server, bucket, phase="dropSource")
            M(job(postgres, database, spec), make_store(FileMigrationSpec.model_validate(spec), env)).run()
        data = scalar(conn, """SELECT data FROM "File" WHERE id = 'f0000'""")
        assert base64.b64decode(data) == originals["f0000"]  # the only good copy is kept


def test_column_guard_refuses_new_data(postgres: Any, database: str) -> None:
    from pgscale.pg import files as sqlf

    src = sqlf.Source("public", "File", "id", "data", "filePath", "storageType")
    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        conn.execute("""INSERT INTO "File" (id, "fileName", data) VALUES ('a', 'a', 'QUJD')""")
        assert not sqlf.guard_data_column(conn, src, 1000)  # a row holds data: no guard
        conn.execute("""UPDATE "File" SET data = NULL""")
        assert sqlf.guard_data_column(conn, src, 1000)
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("""INSERT INTO "File" (id, "fileName", data) VALUES ('b', 'b', 'QUJD')""")


def test_dry_run_moves_nothing(postgres: Any, database: str, s3_server: Any, bucket: str) -> None:
    import subprocess
    import sys
    from pathlib import Path

    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        seed_files(conn, [10, 20, 30])
        owner = ObjectRef("pgscale.io/v1alpha1", "FileMigration", "ns", "files-to-s3", "uid")
        profile = DatabaseProfileSpec.model_validate({"connection": {"secretRef": {"name": "app-db"}}})
        env = {
            e["name"]: e["value"] for e in builders.job_env(owner, spec_for(s3_server, bucket), profile) if "value" in e
        }
        env.update(PGSCALE_DB_URI=postgres.uri(database), PATH=os.environ["PATH"])
        out = subprocess.run(
            [str(Path(sys.executable).parent / "pgscale"), "job", "file-migration", "--dry-run"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        report = json.loads(out.stdout)
        assert report["outcome"] == "DryRun" and report["rows_pending"] == 3
        assert "Contents" not in client(s3_server).list_objects_v2(Bucket=bucket)


def test_writes_carry_their_sha256_and_a_mismatch_is_never_completed(s3_server: Any, bucket: str) -> None:
    """Each PUT and part carries x-amz-checksum-sha256 (S3, MinIO, Ceph refuse other bytes; moto 5.2.5
    stores it unchecked); a multipart stream whose bytes differ from the announced hash is aborted."""
    s3 = client(s3_server)
    store = S3Store(s3, bucket, "c/", part_size=5 * MiB, multipart_threshold=5 * MiB)
    small, big = os.urandom(1000), os.urandom(6 * MiB)
    for key, data in (("small", small), ("big", big)):
        sha = hashlib.sha256(data).hexdigest()
        assert store.put_new(key, [data], size=len(data), sha256=sha, content_type=None)  # confirmed: no HEAD
        assert store.head(key) == ObjectInfo(len(data), sha)
    sent = s3.head_object(Bucket=bucket, Key="c/small", ChecksumMode="ENABLED")["ChecksumSHA256"]
    assert base64.b64decode(sent) == hashlib.sha256(small).digest()
    with pytest.raises(ChecksumMismatch, match="upload aborted"):
        store.put_new("bad", [big], size=len(big), sha256=hashlib.sha256(small).hexdigest(), content_type=None)
    assert store.head("bad") is None
    assert not s3.list_multipart_uploads(Bucket=bucket).get("Uploads")
