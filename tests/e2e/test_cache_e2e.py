"""Cache end to end: the example creates the server's and the relay's Deployments, the Service, the
ConfigMap and the Secrets and is Ready; its trigger and outbox are in the database; the rendered
config runs a real redis-server with the password from the Secret; a template naming an unknown
column is Stalled naming the field; deleting the Cache removes the trigger and the outbox."""

from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import localenv
import psycopg
import pytest
import redis

from conftest import Kubectl, load_example, wait_until
from pgscale.cache import cache_id, outbox_table, trigger_name
from pgscale.pg import cache as sqlc
from pgscale.specs import cache as specs

pytestmark = [pytest.mark.cluster, pytest.mark.postgres]
MiB = 1024 * 1024

PROFILE = {
    "apiVersion": "pgscale.io/v1alpha1",
    "kind": "DatabaseProfile",
    "metadata": {"name": "app"},
    "spec": {"connection": {"secretRef": {"name": "app-db"}}},
}


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == ctype), {})


def secret_data(kubectl: Kubectl, name: str) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in kubectl.get("secret", name)["data"].items()}


def triggers(conn: psycopg.Connection, cid: str) -> list[str]:
    rows = conn.execute(
        "SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = %s", (trigger_name(cid),)
    ).fetchall()
    return [r[0] for r in rows]


def outbox_exists(conn: psycopg.Connection, cid: str) -> bool:
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"pgscale.{outbox_table(cid)}",)).fetchone() == (True,)


def test_example_cache_objects_trigger_and_cleanup(
    operator: localenv.OperatorProcess,
    kubectl: Kubectl,
    postgres: localenv.Postgres,
    database: str,
    app_secret: str,
    tmp_path: Path,
) -> None:
    kubectl.apply(PROFILE)
    [cache] = load_example("cache.yaml")
    kubectl.apply(cache)
    kubectl.wait("cache", "tasks", "Ready", timeout=90)
    obj = kubectl.get("cache", "tasks")
    status = obj["status"]
    assert status["service"] == "tasks-cache" and status["appSecret"] == "tasks-cache-app"
    assert status["maxmemory"] == "192Mi" and status["tables"] == ["public.Task"]
    assert status["outboxDepth"] == 0
    assert "pgscale.io/cleanup" in obj["metadata"]["finalizers"]
    cid = cache_id(kubectl.namespace, "tasks")

    server = kubectl.get("deployment", "tasks-cache")
    pod = server["spec"]["template"]["spec"]
    assert pod["containers"][0]["image"] == "valkey/valkey:8.1"
    assert pod["securityContext"]["runAsNonRoot"] and pod["automountServiceAccountToken"] is False
    assert pod["containers"][0]["resources"]["limits"]["memory"] == str(256 * 1024 * 1024)
    assert server["metadata"]["ownerReferences"][0]["kind"] == "Cache"
    relay = kubectl.get("deployment", "tasks-cache-relay")["spec"]["template"]["spec"]["containers"][0]
    assert relay["args"][:2] == ["cache", "relay"]
    assert kubectl.get("service", "tasks-cache")["spec"]["ports"][0]["port"] == 6379

    auth = secret_data(kubectl, "tasks-cache-auth")
    app = secret_data(kubectl, "tasks-cache-app")
    password = auth["password"]
    assert app["url"] == f"redis://:{password}@tasks-cache.{kubectl.namespace}.svc:6379/0"
    config = kubectl.get("configmap", "tasks-cache")["data"][specs.CONFIG_KEY]
    assert password not in config and "maxmemory 201326592" in config and "maxmemory-policy allkeys-lru" in config

    # The rendered config runs a real server, with only its port, bind address and paths moved here.
    if shutil.which("redis-server"):
        port = localenv.free_port()
        (tmp_path / "auth.conf").write_text(auth["auth.conf"])
        local = (
            config.replace("bind * -::*", "bind 127.0.0.1")
            .replace("port 6379", f"port {port}")
            .replace(f"dir {specs.DATA_DIR}", f"dir {tmp_path}")
            .replace(f"include {specs.AUTH_DIR}/{specs.AUTH_KEY}", f"include {tmp_path}/auth.conf")
        )
        (tmp_path / "cache.conf").write_text(local)
        proc = subprocess.Popen(["redis-server", str(tmp_path / "cache.conf")], stdout=subprocess.DEVNULL)
        try:
            client = redis.Redis(port=port, password=password)
            wait_until(lambda: _pings(client), timeout=20, what="redis-server with the rendered config")
            assert client.config_get("maxmemory")["maxmemory"] == "201326592"
        finally:
            proc.terminate()
            proc.wait(10)

    with psycopg.connect(postgres.dsn(database), autocommit=True) as conn:
        assert triggers(conn, cid) == ['"Task"'] and outbox_exists(conn, cid)
        conn.execute("""INSERT INTO "Task" (title, "userId") VALUES ('t', 7)""")
        keys = {r[0] for r in conn.execute(f'SELECT key FROM pgscale."{outbox_table(cid)}"').fetchall()}
        assert keys == {"task:1", "user-tasks:7", "tasks"}

        # Reconciled again: the password stays (never overwritten).
        kubectl.run("annotate", "cache", "tasks", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")
        time.sleep(2)
        assert secret_data(kubectl, "tasks-cache-auth")["password"] == password

        # What the relay writes (INFO) and an invalidation waiting for 5 minutes: alerts as conditions.
        info = {"keyspace_hits": 10.0, "keyspace_misses": 990.0, "used_memory_rss": 250.0 * MiB}
        sqlc.write_stats(conn, "pgscale", cid, info)
        old = "INSERT INTO pgscale.{} (key, created_at) VALUES ('old', now() - interval '5 minutes')"
        conn.execute(old.format(f'"{outbox_table(cid)}"'))
        kubectl.run("annotate", "cache", "tasks", f"pgscale.io/reconcile-at={time.time()}", "--overwrite")

        def alerting() -> dict[str, Any] | None:
            found = kubectl.get("cache", "tasks")
            return found if condition(found, "AlertsFiring").get("status") == "True" else None

        obj = wait_until(alerting, timeout=60, what="AlertsFiring", log=operator.log)
        firing = condition(obj, "AlertsFiring")["message"]
        assert "hit ratio below 80%" in firing and "resident memory over 80% of 256Mi" in firing
        assert condition(obj, "RelayBehind")["status"] == "True" and obj["status"]["hitRatio"] == 0.01
        assert condition(obj, "Ready")["status"] == "True"  # alerts do not make the Cache unready

        # An unknown column: Stalled, naming the field and the fix.
        kubectl.run(
            "patch", "cache", "tasks", "--type=json", "-p",
            '[{"op": "replace", "path": "/spec/invalidate/0/keys/1", "value": "user-tasks:{userid}"}]',
        )  # fmt: skip

        def stalled() -> dict[str, Any] | None:
            found = condition(kubectl.get("cache", "tasks"), "Stalled")
            return found if found.get("reason") == "ColumnNotFound" else None

        message = wait_until(stalled, timeout=60, what="Stalled ColumnNotFound", log=operator.log)["message"]
        assert "spec.invalidate[0].keys[1]" in message and "{userId}" in message

        # No tables to invalidate: triggers, outbox, relay and finalizer go; the cache stays.
        kubectl.run("patch", "cache", "tasks", "--type=json", "-p", '[{"op": "remove", "path": "/spec/invalidate"}]')

        def plain() -> dict[str, Any] | None:
            found = kubectl.get("cache", "tasks")
            done = condition(found, "Ready").get("status") == "True" and not found["metadata"].get("finalizers")
            return found if done and found["metadata"]["generation"] == found["status"]["observedGeneration"] else None

        assert (
            wait_until(plain, timeout=60, what="Ready without invalidation", log=operator.log)["status"]["tables"] == []
        )
        assert triggers(conn, cid) == [] and not outbox_exists(conn, cid)
        wait_until(lambda: _absent(kubectl, "deployment", "tasks-cache-relay"), timeout=60, what="the relay to go")
        assert not _absent(kubectl, "deployment", "tasks-cache")

        kubectl.apply(cache)  # the example again: triggers back, then deletion removes them
        kubectl.wait("cache", "tasks", "Ready", timeout=60)
        wait_until(lambda: triggers(conn, cid) == ['"Task"'], timeout=60, what="the trigger back")
        kubectl.run("delete", "cache", "tasks", "--timeout=60s")
        assert triggers(conn, cid) == [] and not outbox_exists(conn, cid)
        conn.execute("""UPDATE "Task" SET title = 'after'""")  # the table works without the trigger


def _absent(kubectl: Kubectl, kind: str, name: str) -> bool:
    result = kubectl.cp.kubectl_run("-n", kubectl.namespace, "get", kind, name, "--ignore-not-found", "-o", "name")
    return result.stdout.strip() == ""


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False
