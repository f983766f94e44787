"""Fixtures: real components on loopback, started once per session (see hack/localenv.py).

Unit tests (tests/unit) use none of them. Everything else gets a real
kube-apiserver with controller-manager, a real PostgreSQL server, a real
S3-compatible server and the operator as a subprocess; each test gets its own
namespace and database.

The PostgreSQL version is Debian's 15 unless `--pg-version N` (or PGSCALE_PG_VERSION=N) picks
another of hack/postgres-versions.txt; tests marked `debian_pg15` (pg_cron, pg_partman, the
client programs) are skipped then, with the reason.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "hack"))

import localenv  # noqa: E402

import node as nodemod  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-version",
        type=int,
        default=None,
        help="PostgreSQL major version of the servers the tests start (sets PGSCALE_PG_VERSION; default: "
        f"Debian's {localenv.DEBIAN_MAJOR}; one of {', '.join(map(str, localenv.postgres_majors()))})",
    )


def pytest_configure(config: pytest.Config) -> None:
    version = config.getoption("--pg-version")
    if version is not None:
        os.environ["PGSCALE_PG_VERSION"] = str(version)  # the harness and the processes it starts read it
    try:
        localenv.selected_major()
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_report_header(config: pytest.Config) -> str:
    major = localenv.selected_major()
    if major == localenv.DEBIAN_MAJOR:
        return f"PostgreSQL {major}: Debian's ({localenv.PG_BIN})"
    return f"PostgreSQL {major}: {localenv.PG_PACKAGE}@{localenv.postgres_pins()[major].version}"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _node_restarts_first(items)
    major = localenv.selected_major()
    if major == localenv.DEBIAN_MAJOR:
        return
    skip = pytest.mark.skip(
        reason=f"needs Debian's PostgreSQL {localenv.DEBIAN_MAJOR} (pg_cron, pg_partman or its client programs); "
        f"this run is on {major}"
    )
    for item in items:
        if item.get_closest_marker("debian_pg15"):
            item.add_marker(skip)


def _node_restarts_first(items: list[pytest.Item]) -> None:
    """test_node_smoke.py stops and starts the node (test_stop_leaves_the_host_clean), which restarts every
    pod on it: its tests run before the first test that uses the session's operator release, whose pods
    are checked for restarts (test_cache_pods.py sorts before it and would otherwise start the release)."""
    smoke = [i for i in items if i.path.name == "test_node_smoke.py"]
    if not smoke:
        return
    rest = [i for i in items if i.path.name != "test_node_smoke.py"]
    first = next((n for n, i in enumerate(rest) if "operator_release" in getattr(i, "fixturenames", ())), len(rest))
    items[:] = rest[:first] + smoke + rest[first:]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("env")


@contextmanager
def started_control_plane(workdir: Path) -> Iterator[localenv.ControlPlane]:
    """A control plane with pgscale's CRDs established, stopped on exit."""
    cp = localenv.ControlPlane(workdir)
    try:
        cp.start()
        cp.kubectl_run("apply", "--server-side", "-f", str(ROOT / "crds"), check=True)
        cp.kubectl_run("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=True)
        yield cp
    finally:
        cp.stop()


@pytest.fixture(scope="session")
def control_plane(workdir: Path) -> Iterator[localenv.ControlPlane]:
    with started_control_plane(workdir) as cp:
        yield cp


@pytest.fixture(scope="session")
def node_control_plane(workdir: Path) -> Iterator[localenv.ControlPlane]:
    """The node's own cluster: the e2e suite's operator (a process on the host watching every
    namespace of `control_plane`) must not reconcile what the chart's operator in its pod does."""
    with started_control_plane(workdir / "node-cluster") as cp:
        yield cp


@pytest.fixture(scope="session")
def node(workdir: Path, node_control_plane: localenv.ControlPlane) -> Iterator[nodemod.Node]:
    """A real node (hack/node.py) registered with node_control_plane: pods run in containers.

    Started only when a test asks for it (the `node` tests). A machine that cannot run it fails the
    tests with the reason; PGSCALE_NODE=0 skips them instead.
    """
    if os.environ.get("PGSCALE_NODE") == "0":
        pytest.skip("PGSCALE_NODE=0: tests that need the node are skipped")
    reason = nodemod.unsupported()
    if reason:
        pytest.fail(f"this machine cannot run the test node: {reason} (PGSCALE_NODE=0 skips these tests)",
                    pytrace=False)  # fmt: skip
    started = nodemod.Node(workdir / "node-cluster", node_control_plane)
    try:
        yield started.start()
    finally:
        started.stop()
        timings = ", ".join(f"{k} {v:.1f}s" for k, v in started.timings.items())
        sys.stderr.write(f"\nnode logs: {started.logs} ({timings})\n")


@pytest.fixture(scope="session")
def node_image(node: nodemod.Node) -> str:
    """A small Debian image (bash, curl, busybox, iproute2, netcat) imported into the node: its name."""
    archive, name = nodemod.test_image()
    node.import_image(archive)
    return name


@pytest.fixture(scope="session")
def node_postgres(workdir: Path, node: nodemod.Node) -> Iterator[localenv.Postgres]:
    """PostgreSQL on the host end of the node's link (HOST_IP): pods reach it as they would reach a
    database outside the cluster; dsn() and uri() name HOST_IP."""
    server = localenv.Postgres(workdir / "node-cluster", host=nodemod.HOST_IP)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def node_s3(workdir: Path, node: nodemod.Node) -> Iterator[localenv.S3Server]:
    """The S3 server on HOST_IP, for pods."""
    server = localenv.S3Server(workdir / "node-cluster", host=nodemod.HOST_IP)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def node_images(node: nodemod.Node) -> dict[str, Path]:
    """pgscale's images (the operator's from the Dockerfile, postgres, pgbouncer), built here when
    their inputs changed (hack/images.py) and imported into the node: {name: archive}."""
    import images

    built = images.build_images()
    for archive in dict.fromkeys(built.values()):
        node.import_image(archive)
    return built


def helm_binary() -> str:
    """The helm binary built from hack/helm (cached)."""
    out = subprocess.run([str(ROOT / "hack" / "build-helm.sh")], check=True, capture_output=True, text=True)
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def operator_release(node_control_plane: localenv.ControlPlane, node_images: dict[str, Path]) -> Iterator[Kubectl]:
    """`helm install` of the chart with its default values (the CRDs are in the cluster already): the
    operator runs in its pods, as its ServiceAccount. A Kubectl in the release's namespace."""
    cp = node_control_plane
    env = {"KUBECONFIG": str(cp.kubeconfig), "PATH": os.environ["PATH"], "HOME": str(cp.dir)}
    helm = helm_binary()
    result = subprocess.run(
        [
            helm,
            "install",
            "pgscale",
            str(ROOT / "charts" / "pgscale"),
            "--namespace",
            "pgscale-system",
            "--create-namespace",
            "--set",
            "crds.install=false",
            "--wait",
            "--timeout",
            "300s",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=400,
    )
    k = Kubectl(cp, "pgscale-system")
    if result.returncode != 0:
        pods = k.run("get", "pods", "-o", "wide", check=False)
        described = k.run("describe", "pods", check=False)
        raise AssertionError(f"helm install failed: {result.stderr}\n{pods}\n{described[-4000:]}")
    try:
        yield k
    finally:
        sys.stderr.write("\n" + cp.kubectl_run("get", "pods", "-A", "-o", "wide").stdout)
        subprocess.run(
            [helm, "uninstall", "pgscale", "--namespace", "pgscale-system", "--wait", "--timeout", "120s"],
            capture_output=True,
            text=True,
            env=env,
            timeout=200,
        )


def wait_until(check: Callable[[], Any], timeout: float = 60, what: str = "condition",
               log: Path | None = None) -> Any:  # fmt: skip
    """Poll check() every 0.5 s until it returns something true; fail naming what (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    tail = f"; operator log:\n{log.read_text()[-3000:]}" if log is not None else ""
    raise AssertionError(f"timed out after {timeout}s waiting for {what}{tail}")


@pytest.fixture(scope="session")
def postgres(workdir: Path) -> Iterator[localenv.Postgres]:
    server = localenv.Postgres(workdir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def logical_servers(workdir: Path) -> Iterator[tuple[localenv.Postgres, localenv.Postgres]]:
    """Two servers with wal_level=logical: the monolith's and the messages' own."""
    source = localenv.Postgres(workdir, name="split-source", wal_level="logical")
    target = localenv.Postgres(workdir, name="split-target", wal_level="logical")
    try:
        for server in (source, target):
            server.start()
            # Replication workers start (and restart) this soon, not after the default 5 s.
            server.execute("ALTER SYSTEM SET wal_retrieve_retry_interval = '200ms'")
            server.execute("SELECT pg_reload_conf()")
        yield source, target
    finally:
        source.stop()
        target.stop()


@pytest.fixture
def private_postgres(tmp_path: Path) -> Iterator[localenv.Postgres]:
    """A server of the test's own, for server-wide changes (ALTER SYSTEM, restarts, slots)."""
    pg = localenv.Postgres(tmp_path, name="private")
    try:
        yield pg.start()
    finally:
        pg.stop()


@pytest.fixture(scope="session")
def s3_server(workdir: Path) -> Iterator[localenv.S3Server]:
    server = localenv.S3Server(workdir)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def operator_kubeconfig(workdir: Path, control_plane: localenv.ControlPlane) -> Path:
    """The identity the operator runs as: the chart's ServiceAccount with the chart's ClusterRole (manifests/).

    So every e2e test also shows that operator/pgscale/rbac.py grants enough for what it exercises.
    """
    return localenv.operator_identity(control_plane, workdir)


@pytest.fixture(scope="session")
def operator(workdir: Path, control_plane: localenv.ControlPlane,
             operator_kubeconfig: Path) -> Iterator[localenv.OperatorProcess]:  # fmt: skip
    op = localenv.OperatorProcess(workdir, operator_kubeconfig)
    try:
        yield op.start("--all-namespaces")
    finally:
        op.stop()
        sys.stderr.write(f"\noperator log: {op.log}\n")


class Kubectl:
    """kubectl bound to one namespace of the local control plane."""

    def __init__(self, cp: localenv.ControlPlane, namespace: str) -> None:
        self.cp = cp
        self.namespace = namespace

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        result = self.cp.kubectl_run("-n", self.namespace, *args, input=input)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout

    def apply(self, obj: dict[str, Any] | str, *extra: str, check: bool = True) -> Any:
        text = obj if isinstance(obj, str) else yaml.safe_dump(obj)
        return self.cp.kubectl_run("-n", self.namespace, "apply", "-f", "-", *extra, input=text) if not check \
            else self.run("apply", "-f", "-", *extra, input=text)  # fmt: skip

    def get(self, kind: str, name: str) -> dict[str, Any]:
        return dict(json.loads(self.run("get", kind, name, "-o", "json")))

    def wait(self, kind: str, name: str, condition: str, timeout: int = 60) -> str:
        return self.run("wait", f"--for=condition={condition}", f"{kind}/{name}", f"--timeout={timeout}s")

    def secret(self, name: str, data: dict[str, str]) -> None:
        self.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": data})


@pytest.fixture
def namespace(control_plane: localenv.ControlPlane) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:10]}"
    control_plane.kubectl_run("create", "namespace", name, check=True)
    yield name
    # Profiles go at once (no waiting for the namespace controller): a profile left on the shared server
    # would own its settings and stall the next test's profile (SettingsConflict).
    control_plane.kubectl_run("delete", "databaseprofiles", "--all", "-n", name, "--wait=false")
    control_plane.kubectl_run("delete", "namespace", name, "--wait=false")


@pytest.fixture
def kubectl(control_plane: localenv.ControlPlane, namespace: str) -> Kubectl:
    return Kubectl(control_plane, namespace)


@pytest.fixture
def database(postgres: localenv.Postgres) -> Iterator[str]:
    """A fresh database with the sample application's schema."""
    name = f"app_{uuid.uuid4().hex[:10]}"
    postgres.execute(f'CREATE DATABASE "{name}"')
    with psycopg.connect(postgres.dsn(name), autocommit=True) as conn:
        conn.execute((ROOT / "examples" / "sample-app.sql").read_text())
    yield name
    postgres.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def app_secret(kubectl: Kubectl, postgres: localenv.Postgres, database: str) -> str:
    """The Secret the examples' DatabaseProfile points at, in CloudNativePG's layout."""
    kubectl.secret("app-db", {
        "uri": postgres.uri(database), "host": postgres.host, "port": str(postgres.port),
        "dbname": database, "username": "postgres", "password": postgres.PASSWORD,
    })  # fmt: skip
    return "app-db"


def load_example(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((ROOT / "examples" / name).read_text()) if d]


def pod_env(env: list[dict[str, Any]], secrets: dict[str, dict[str, str]], pod_name: str = "job-pod") -> dict[str, str]:
    """A container's environment as the kubelet would build it (values, secretKeyRef, fieldRef)."""
    out: dict[str, str] = {}
    for entry in env:
        if "value" in entry:
            out[entry["name"]] = entry["value"]
            continue
        source = entry["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            data = secrets.get(ref["name"])
            if data is None or ref["key"] not in data:
                if ref.get("optional"):
                    continue
                raise AssertionError(f"pod would not start: Secret {ref['name']} key {ref['key']} missing")
            out[entry["name"]] = data[ref["key"]]
        elif source.get("fieldRef", {}).get("fieldPath") == "metadata.name":
            out[entry["name"]] = pod_name
    return out


def _container(pod_spec: dict[str, Any], secrets: dict[str, dict[str, str]]) -> tuple[list[str], dict[str, str]]:
    container = pod_spec["containers"][0]
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"),
           **pod_env(container.get("env", []), secrets)}  # fmt: skip
    exe = str(Path(sys.executable).parent / "pgscale")  # the image's entrypoint
    return [exe, *container.get("command", [])[1:], *container["args"]], env


def run_container(
    pod_spec: dict[str, Any], secrets: dict[str, dict[str, str]], *, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the pod's (only) container for real, to completion."""
    args, env = _container(pod_spec, secrets)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def start_container(pod_spec: dict[str, Any], secrets: dict[str, dict[str, str]]) -> subprocess.Popen[str]:
    """Start the pod's container in the background (to kill it mid-run)."""
    args, env = _container(pod_spec, secrets)
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def scalar(conn: psycopg.Connection, query: str, params: Any = None) -> Any:
    """The first column of the first row."""
    row = conn.execute(query, params).fetchone()
    return row[0] if row else None


def s3_user(endpoint: str, name: str, actions: list[str]) -> dict[str, str]:
    """A user of a moto server that checks permissions, allowed `actions` on every resource: its keys, as
    the AWS_* variables of a credentials Secret (three requests, counted by S3Server's authenticated_after)."""
    import boto3

    iam = boto3.client(
        "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="setup", aws_secret_access_key="setup"
    )
    iam.create_user(UserName=name)
    document = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
    iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(document))
    key = iam.create_access_key(UserName=name)["AccessKey"]
    return {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def seed_tasks(conn: psycopg.Connection, n: int) -> None:
    """n tasks over two years; a third pending, the rest completed an hour after creation."""
    conn.execute(
        """INSERT INTO "Task" (title, status, "userId", "createdAt", "completedAt")
           SELECT 'task ' || g, CASE WHEN g %% 3 = 0 THEN 'PENDING' ELSE 'COMPLETED' END, g %% 50,
                  now() - (g * (730.0 / %(n)s) || ' days')::interval,
                  CASE WHEN g %% 3 = 0 THEN NULL
                       ELSE now() - (g * (730.0 / %(n)s) || ' days')::interval + interval '1 hour' END
           FROM generate_series(1, %(n)s) g""",
        {"n": n},
    )


def kill_after_batches(proc: subprocess.Popen[str], conn: psycopg.Connection, after_run: int, batches: int) -> int:
    """SIGKILL a running `pgscale job retention` once its run (newer than ``after_run``) has committed
    ``batches`` batches, or after 60 s; returns that run's id (``after_run`` when none started)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        row = None
        if scalar(conn, "SELECT to_regclass('pgscale.retention_runs')"):
            row = conn.execute(
                "SELECT id, batches FROM pgscale.retention_runs WHERE outcome = 'Running' AND id > %s "
                "ORDER BY id DESC LIMIT 1",
                (after_run,),
            ).fetchone()
        if row and row[1] >= batches:
            after_run = row[0]
            break
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return after_run
