"""A Cache in real pods: the server from a locally built image, the relay from the operator's image.

The chart's operator (in its pods, as in test_operator_pods.py) reconciles the example Cache with
`spec.image` set to Debian's redis-server built here (hack/images.py REDIS_IMAGE; valkey/valkey
cannot be pulled). The server pod runs with the builder's hardened settings (uid 65532, read-only
root, the config and auth files mounted); the relay pod reaches Postgres on the host side of the
node's link and the server through the Service's DNS name in the application Secret's URL. The
test connects with that URL's password through the Service's ClusterIP (the host has no cluster
DNS), caches keys, updates their row, and the relay pod deletes them.
"""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import images
import localenv
import psycopg
import pytest
import redis

from conftest import ROOT, Kubectl, load_example, wait_until
from pgscale.cache import cache_id, outbox_table, trigger_name
from pgscale.specs import cache as specs

pytestmark = [pytest.mark.node, pytest.mark.cluster, pytest.mark.postgres]

PROFILE = {
    "apiVersion": "pgscale.io/v1alpha1",
    "kind": "DatabaseProfile",
    "metadata": {"name": "app"},
    "spec": {"connection": {"secretRef": {"name": "app-db"}}},
}


@pytest.fixture(scope="module")
def cache_ns(
    node_control_plane: localenv.ControlPlane,
    node_postgres: localenv.Postgres,
    node_images: dict[str, Any],
    operator_release: Kubectl,
) -> Iterator[tuple[Kubectl, str]]:
    """A namespace and a database with the sample schema; the profile `app` points at it (HOST_IP)."""
    assert images.REDIS_IMAGE in node_images, sorted(node_images)
    cp = node_control_plane
    name = f"cache-{uuid.uuid4().hex[:6]}"
    cp.kubectl_run("create", "namespace", name, check=True)
    k = Kubectl(cp, name)
    db = name.replace("-", "_")
    node_postgres.execute(f'CREATE DATABASE "{db}"')
    with psycopg.connect(node_postgres.dsn(db), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
    k.secret("app-db", {"uri": node_postgres.uri(db)})
    k.apply(PROFILE)
    yield k, db
    cp.kubectl_run("delete", "caches,databaseprofiles", "--all", "-n", name, "--wait=true", "--timeout=60s")
    cp.kubectl_run("delete", "namespace", name, "--wait=false")
    node_postgres.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')


def pods(k: Kubectl, selector: str) -> list[dict[str, Any]]:
    return list(json.loads(k.run("get", "pods", "-l", selector, "-o", "json"))["items"])


def story(k: Kubectl, operator: Kubectl) -> str:
    """The Cache's pods (phase, container states, last log lines) and the operator's last log lines."""
    out = []
    for kubectl, selector in (
        (k, "app.kubernetes.io/managed-by=pgscale"),
        (operator, "app.kubernetes.io/name=pgscale"),
    ):
        for pod in pods(kubectl, selector):
            name = pod["metadata"]["name"]
            states = json.dumps([c.get("state") for c in pod.get("status", {}).get("containerStatuses", [])])
            log = kubectl.run("logs", name, "--tail=15", check=False) or kubectl.run(
                "logs", name, "-p", "--tail=15", check=False
            )
            out.append(f"--- {name} {pod.get('status', {}).get('phase')} {states}\n{log}")
    return "\n".join(out)


def ready_pod(k: Kubectl, operator: Kubectl, component: str, timeout: float = 180) -> dict[str, Any]:
    """The one Ready, not restarted pod of a Cache's Deployment; on timeout, fail with the story."""
    selector = f"pgscale.io/cache=tasks,app.kubernetes.io/component={component}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in pods(k, selector):
            conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
            if conds.get("Ready") == "True" and not pod["metadata"].get("deletionTimestamp"):
                return pod
        time.sleep(1)
    raise AssertionError(f"no Ready pod for {component} after {timeout}s\n{story(k, operator)}")


def exec_in(k: Kubectl, pod: str, *cmd: str) -> tuple[int, str]:
    result = k.cp.kubectl_run("-n", k.namespace, "exec", pod, "--", *cmd)
    return result.returncode, result.stdout + result.stderr


def triggers(conn: psycopg.Connection, cid: str) -> list[str]:
    rows = conn.execute("SELECT tgrelid::regclass::text FROM pg_trigger WHERE tgname = %s", (trigger_name(cid),))
    return [r[0] for r in rows.fetchall()]


def outbox_exists(conn: psycopg.Connection, cid: str) -> bool:
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (f"pgscale.{outbox_table(cid)}",)).fetchone()
    return row == (True,)


def test_cache_server_and_relay_pods_invalidate(
    operator_release: Kubectl, cache_ns: tuple[Kubectl, str], node_postgres: localenv.Postgres
) -> None:
    k, db = cache_ns
    started = time.monotonic()
    [cache] = load_example("cache.yaml")
    cache["spec"]["image"] = images.REDIS_IMAGE
    k.apply(cache)
    k.wait("cache", "tasks", "Ready", timeout=120)
    server = ready_pod(k, operator_release, specs.COMPONENT)
    relay = ready_pod(k, operator_release, specs.RELAY_COMPONENT)
    up = time.monotonic() - started
    for pod in (server, relay):
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0, story(k, operator_release)

    # The server runs as the builder says: uid 65532, read-only root, the mounted config.
    name = server["metadata"]["name"]
    code, out = exec_in(k, name, "sh", "-c", "id -u; cat /proc/1/cmdline | tr '\\0' ' '; touch /probe")
    assert code != 0 and "Read-only file system" in out, out
    assert out.splitlines()[0] == "65532", out
    assert f"redis-server {specs.CONFIG_DIR}/{specs.CONFIG_KEY}" in out or "redis-server *:6379" in out, out

    # The application Secret's URL, with the Service's ClusterIP for the name (no cluster DNS on the host).
    app = {
        key: base64.b64decode(v).decode() for key, v in k.get("secret", specs.app_secret_name("tasks"))["data"].items()
    }
    url = urllib.parse.urlsplit(app["url"])
    assert url.hostname == f"tasks-cache.{k.namespace}.svc" and url.port == specs.PORT
    cluster_ip = k.get("service", specs.server_name("tasks"))["spec"]["clusterIP"]
    client = redis.Redis.from_url(app["url"].replace(url.hostname, cluster_ip), socket_timeout=5)

    def pings() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:  # kube-proxy programs the Service a moment after the pod is Ready
            return False

    wait_until(pings, timeout=30, what="PING through the Service with the Secret's URL")
    assert client.config_get("maxmemory")["maxmemory"] == str(192 * 1024 * 1024)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host=cluster_ip, port=specs.PORT, password="wrong").ping()

    # Keys for a row; an UPDATE moving it to another user: the relay pod deletes old and new keys and the tag.
    cid = cache_id(k.namespace, "tasks")
    with psycopg.connect(node_postgres.dsn(db), autocommit=True) as conn:
        row = conn.execute("""INSERT INTO "Task" (title, "userId") VALUES ('cached', 7) RETURNING id""").fetchone()
        assert row
        task = row[0]
        wait_until(lambda: _outbox_rows(conn, cid) == 0, timeout=30, what="the relay to drain the insert")
        keys = [f"task:{task}", "user-tasks:7", "user-tasks:8", "task-list:page:1"]
        for key in keys:
            client.set(key, "v")
        client.sadd("tasks", "task-list:page:1")
        client.set("unrelated", "stays")
        t0 = time.monotonic()
        conn.execute("""UPDATE "Task" SET title = 'changed', "userId" = 8 WHERE id = %s""", (task,))
        wait_until(lambda: client.exists(*keys, "tasks") == 0, timeout=30, what=f"the relay pod to delete {keys}")
        invalidated = time.monotonic() - t0
        assert client.get("unrelated") == b"stays"
        wait_until(lambda: _outbox_rows(conn, cid) == 0, timeout=30, what="the outbox to be empty")

        # The relay's metrics on its pod's IP (the host reaches the pod network).
        metrics = urllib.request.urlopen(f"http://{relay['status']['podIP']}:{specs.METRICS_PORT}/metrics", timeout=10)
        text = metrics.read().decode()
        done = [line for line in text.splitlines() if line.startswith("pgscale_cache_invalidations_total{")]
        assert done and float(done[0].split()[-1]) >= 2, text[-2000:]

        # Deleting the Cache drops the trigger and the outbox (finalizer); the table works without them.
        assert triggers(conn, cid) == ['"Task"'] and outbox_exists(conn, cid)
        k.run("delete", "cache", "tasks", "--timeout=60s")
        assert triggers(conn, cid) == [] and not outbox_exists(conn, cid)
        conn.execute("""UPDATE "Task" SET title = 'after' WHERE id = %s""", (task,))
    wait_until(
        lambda: (
            not k.run("get", "deployments,services,secrets,configmaps", "-l", "pgscale.io/cache=tasks", "-o", "name")
        ),
        timeout=60,
        what="the garbage collector to remove the Cache's objects",
    )
    print(f"\ncache pods Ready {up:.1f}s after apply; invalidated through the relay pod in {invalidated:.2f}s")


def _outbox_rows(conn: psycopg.Connection, cid: str) -> int:
    row = conn.execute(f'SELECT count(*) FROM pgscale."{outbox_table(cid)}"').fetchone()
    return int(row[0]) if row else -1
