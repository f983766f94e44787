"""The images of hack/images.py, imported into a private containerd and run the way pods run them.

A containerd of this module's own (config, socket, root and state under CTR_DIR, default
/tmp/img-ctr; never the machine's /run/containerd/containerd.sock) imports every archive with
`ctr -n k8s.io images import`, as the node does, and runs containers with `ctr run`:

- the operator image (built by buildah from the Dockerfile) runs `pgscale --help` and
  `pgscale job --help` as 65532 with a read-only root filesystem, and writes nothing at all
  when its root is writable (its snapshot's upper directory stays empty);
- `postgres:15` has the tools replica pods call, the official image's uid/gid 999, initializes
  and serves a primary through its entrypoint, and a second container running pgscale's own
  replica bootstrap script (as uid 999, as the StatefulSet does) clones it and streams;
- `pgbouncer/pgbouncer:1.24.1` runs as a non-root uid with a read-only root and serves the
  pgbouncer.ini / userlist.txt pgscale renders, mounted read-only like the pooler's Secret;
- `pgscale.local/redis-server:1` runs a Cache's rendered config, unchanged, from the pod's args
  alone, as 65532 with a read-only root (tests/node/test_cache_pods.py runs it in a pod).

Skipped only when this machine cannot run containerd at all (not root, no overlayfs); a
missing containerd, ctr or runc fails (hack/setup.sh installs them). The images are built
when not cached (a few minutes cold; hack/setup.sh builds them first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import images
import pytest

from pgscale.api.cache import CacheSpec
from pgscale.api.databaseprofile import PoolingSpec
from pgscale.kube import ObjectRef
from pgscale.specs import cache as cache_specs
from pgscale.specs import pooling, replicas

pytestmark = pytest.mark.images

CTR_DIR = Path(os.environ.get("PGSCALE_IMAGES_CTR_DIR", "/tmp/img-ctr"))
TMPFS_SIZE = os.environ.get("PGSCALE_IMAGES_CTR_TMPFS", "6g")
CGROUP_PARENT = "pgscale-images"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# Shim sockets go to /run/containerd/s whatever the config says (containerd 1.6).
SHIM_DIRS = (Path("/run/containerd/s"), Path("/run/containerd"))
PASSWORD = "image-test-pw"


def cannot_run_containerd() -> str | None:
    if sys.platform != "linux":
        return "containerd runs on Linux only"
    if os.geteuid() != 0:
        return "needs root: containerd, runc, mmdebstrap and buildah run as root"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (containerd's snapshotter)"
    return None


def mounts_under(path: Path) -> list[str]:
    prefix = str(path) + "/"
    points = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    return [p for p in points if p.startswith(prefix) or p == str(path)]


def our_cgroups() -> list[Path]:
    return [d for d in CGROUP_ROOT.glob(f"*/{CGROUP_PARENT}") if d.is_dir()]


class PrivateContainerd:
    """containerd with everything under one directory, and `ctr` commands against it."""

    def __init__(self, root: Path) -> None:
        self.dir = root
        self.socket = root / "containerd.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        self.created_shim_dirs = [d for d in SHIM_DIRS if not d.exists()]
        self.containers: list[str] = []

    def start(self) -> PrivateContainerd:
        missing = [b for b in ("containerd", "ctr", "runc") if shutil.which(b) is None]
        if missing:
            pytest.fail(f"{', '.join(missing)} not installed: run hack/setup.sh (Debian packages containerd, runc)")
        self._kill_stale()
        if self.dir.exists():
            self._unmount()
            assert not mounts_under(self.dir), f"mounts left under {self.dir}: {mounts_under(self.dir)}"
            shutil.rmtree(self.dir)
        # Everything on a tmpfs: unpacked images are ~50,000 files, which take 30-40 s to delete
        # from disk but no time to unmount. Room for the three images with a margin.
        self.dir.mkdir(parents=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "pgscale-images", str(self.dir)],
                       check=True)  # fmt: skip
        for sub in ("root", "state", "fifo", "runc", "logs"):
            (self.dir / sub).mkdir(parents=True)
        config = self.dir / "config.toml"
        config.write_text(
            f"""version = 2
root = "{self.dir}/root"
state = "{self.dir}/state"
# No CRI (nothing here is a node), no /opt/containerd, no snapshotters this machine lacks.
disabled_plugins = ["io.containerd.grpc.v1.cri", "io.containerd.internal.v1.opt",
  "io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{self.socket}"
[ttrpc]
  address = "{self.socket}.ttrpc"
[debug]
  address = "{self.dir}/debug.sock"
"""
        )
        log = (self.dir / "containerd.log").open("ab")
        self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True)  # fmt: skip
        (self.dir / "containerd.pid").write_text(str(self.proc.pid))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"containerd exited: {(self.dir / 'containerd.log').read_text()[-2000:]}")
            if self.socket.exists() and self.ctr("version", check=False).returncode == 0:
                return self
            time.sleep(0.2)
        pytest.fail(f"containerd not ready: {(self.dir / 'containerd.log').read_text()[-2000:]}")

    def _kill_stale(self) -> None:
        """A containerd this module started in a run that died (its pid file, its config on the command line)."""
        pidfile = self.dir / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text())
            if str(self.dir / "config.toml") in Path(f"/proc/{pid}/cmdline").read_text():
                os.kill(pid, signal.SIGKILL)
                time.sleep(0.5)

    def ctr(self, *args: str, check: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["ctr", "--address", str(self.socket), "--namespace", "k8s.io", *args],
                                capture_output=True, text=True, timeout=timeout)  # fmt: skip
        if check:
            assert result.returncode == 0, f"ctr {' '.join(args)}: {result.stdout}{result.stderr}"
        return result

    def run(self, image: str, name: str, *command: str, read_only: bool = False, mounts: Sequence[str] = (),
            env: Sequence[str] = (), detach: bool = False, keep: bool = False, netns_of: str | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """`ctr run` of `image` (a name as pods write it) with `command` replacing entrypoint and cmd.

        Removed afterwards unless `detach` or `keep`. `netns_of` joins another container's network.
        """
        args = ["run", "--runc-root", str(self.dir / "runc"), "--fifo-dir", str(self.dir / "fifo"),
                "--cgroup", f"/{CGROUP_PARENT}/{name}"]  # fmt: skip
        if not detach and not keep:
            args.append("--rm")
        if detach:
            args += ["--detach", "--log-uri", f"file://{self.dir / 'logs' / name}.log"]
        if read_only:
            args.append("--read-only")
        for mount in mounts:
            args += ["--mount", mount]
        for var in env:
            args += ["--env", var]
        if netns_of:
            args += ["--with-ns", f"network:/proc/{self.pid(netns_of)}/ns/net"]
        self.containers.append(name)
        result = self.ctr(*args, images.normalize(image), name, *command, check=False)
        if not detach and not keep:
            self.containers.remove(name)
        if check:
            assert result.returncode == 0, (
                f"{image} {command}: exit {result.returncode}\n{result.stdout}{result.stderr}"
            )
        return result

    def exec(self, container: str, *command: str, user: str | None = None, check: bool = True,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run `command` in a running container, as root or as the numeric `user` (as runAsUser would).

        Not `ctr tasks exec --user`: ctr 1.6 then mounts the container's live overlay snapshot a
        second time to read /etc/passwd, and that mount resets the shared overlay work directory
        under the running container (seen here: the postgres entrypoint's mktemp failing with
        ENOENT). The kubelet's exec probes do not do this. setpriv (util-linux) is in every image.
        """
        exec_id = f"x{time.monotonic_ns()}"
        args = ["tasks", "exec", "--fifo-dir", str(self.dir / "fifo"), "--exec-id", exec_id]
        if user:
            command = ("setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *command)
        result = self.ctr(*args, container, *command, check=False, timeout=timeout)
        if check:
            assert result.returncode == 0, (
                f"{container}: {command}: {result.stdout}{result.stderr}\n{self.log(container)}"
            )
        return result

    def pid(self, container: str) -> int:
        for line in self.ctr("tasks", "ls").stdout.splitlines()[1:]:
            fields = line.split()
            if fields and fields[0] == container:
                return int(fields[1])
        raise AssertionError(f"no task {container}")

    def log(self, container: str) -> str:
        path = self.dir / "logs" / f"{container}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def upper_dir(self, container: str) -> Path:
        """The writable layer of a container's root filesystem (what it wrote outside its mounts)."""
        out = self.ctr("snapshots", "--snapshotter", "overlayfs", "mounts", "/unused", container).stdout
        options = out.split(" -o ", 1)[1].split()[0]
        return Path(next(o for o in options.split(",") if o.startswith("upperdir=")).split("=", 1)[1])

    def remove(self, container: str) -> None:
        self.ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self.ctr("tasks", "delete", container, check=False).returncode != 0:
            if "not found" in self.ctr("tasks", "ls").stdout or container not in self.ctr("tasks", "ls").stdout:
                break
            time.sleep(0.2)
        self.ctr("containers", "rm", container, check=False)
        if container in self.containers:
            self.containers.remove(container)

    def stop(self) -> list[str]:
        """Stop everything and remove every trace; return what could not be removed."""
        for name in list(self.containers):
            self.remove(name)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for cgroup in our_cgroups():
            for child in sorted(cgroup.glob("*/"), reverse=True):
                with contextlib.suppress(OSError):
                    child.rmdir()
            with contextlib.suppress(OSError):
                cgroup.rmdir()
        for shim_dir in self.created_shim_dirs:  # only if empty: another containerd may use them
            with contextlib.suppress(OSError):
                shim_dir.rmdir()
        self._unmount()
        if not mounts_under(self.dir):
            shutil.rmtree(self.dir, ignore_errors=True)
        return self.leftovers()

    def _unmount(self) -> None:
        """Unmount what a container left under the directory (none expected), then the tmpfs itself."""
        for point in sorted(mounts_under(self.dir), key=len, reverse=True):
            subprocess.run(["umount", point], check=False, capture_output=True)

    def leftovers(self) -> list[str]:
        left = [f"mount {m}" for m in mounts_under(self.dir)]
        left += [f"cgroup {c}" for c in our_cgroups()]
        if self.dir.exists():
            left.append(f"directory {self.dir}")
        if self.proc is not None and self.proc.poll() is None:
            left.append(f"containerd pid {self.proc.pid}")
        return left


@pytest.fixture(scope="session")
def built_images() -> dict[str, images.Built]:
    if reason := cannot_run_containerd():
        pytest.skip(reason)
    return {b.slug: b for b in images.build_all()}


@pytest.fixture(scope="session")
def ctrd(built_images: dict[str, images.Built]) -> Iterator[PrivateContainerd]:
    daemon = PrivateContainerd(CTR_DIR)
    try:
        daemon.start()
        for built in built_images.values():
            daemon.ctr("images", "import", str(built.archive), timeout=600)
        yield daemon
    finally:
        left = daemon.stop()
    assert not left, f"private containerd left {left}"


def layer_members(archive: Path) -> dict[str, tarfile.TarInfo]:
    """The entries of a one-layer image's layer, by path."""
    manifest = images.read_archive(archive)["manifest"]
    assert len(manifest["layers"]) == 1
    blob = "blobs/sha256/" + manifest["layers"][0]["digest"].split(":", 1)[1]
    with tarfile.open(archive) as outer:
        inner = outer.extractfile(blob)
        assert inner is not None
        with tarfile.open(fileobj=inner, mode="r|") as layer:
            return {m.name.removeprefix("./"): m for m in layer}


# ------------------------------------------------------------------------------------------------ names


def test_imported_under_the_names_pods_use(ctrd: PrivateContainerd, built_images: dict[str, images.Built]) -> None:
    held = set(ctrd.ctr("images", "ls", "--quiet").stdout.split())
    own, chart = images.operator_names()
    for name in (own, chart, images.POSTGRES_IMAGE, images.PGBOUNCER_IMAGE, images.REDIS_IMAGE):
        assert images.normalize(name) in held, f"{name} ({images.normalize(name)}) not in {sorted(held)}"
    assert "python-base" not in {b.slug for b in built_images.values()}, "the stand-in base is not a pod image"


# --------------------------------------------------------------------------------------------- operator


def test_operator_image_built_from_the_dockerfile(built_images: dict[str, images.Built]) -> None:
    built = built_images["operator"]
    assert built.info["built_by"].startswith("buildah ") and "(Dockerfile)" in built.info["built_by"]
    config = images.read_archive(built.archive)["config"]["config"]
    assert config["User"] == "65532:65532"
    assert config["Entrypoint"] == ["pgscale"] and config["Cmd"] == ["run", "--all-namespaces"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp"}
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["PATH"].startswith("/opt/pgscale/bin:") and env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert config["Labels"]["org.opencontainers.image.title"] == "pgscale"
    assert "org.opencontainers.image.version" not in config["Labels"], "no label inherited from the stand-in base"


def test_operator_runs_read_only_as_65532(ctrd: PrivateContainerd) -> None:
    image, _ = images.operator_names()
    tmp = "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777"
    ids = ctrd.run(image, "op-id", "sh", "-c", "id -u; id -g", read_only=True, mounts=[tmp]).stdout.split()
    assert ids == ["65532", "65532"]
    out = ctrd.run(image, "op-help", "pgscale", "--help", read_only=True, mounts=[tmp]).stdout
    assert "job" in out and "run" in out
    out = ctrd.run(image, "op-job-help", "pgscale", "job", "--help", read_only=True, mounts=[tmp]).stdout
    for command in ("retention", "file-migration", "partition-maintenance"):
        assert command in out


def test_operator_writes_nothing(ctrd: PrivateContainerd) -> None:
    """With a writable root and /tmp mounted as the pods mount their emptyDir, `pgscale --help`
    and `pgscale job --help` leave the container's writable layer empty: nothing is written
    outside /tmp."""
    image, _ = images.operator_names()
    tmp = "type=tmpfs,src=tmpfs,dst=/tmp,options=nosuid:nodev:mode=1777"
    for name, command in (("op-w1", ["pgscale", "--help"]), ("op-w2", ["pgscale", "job", "--help"]),
                          ("op-w3", ["pgscale", "job", "retention", "--help"])):  # fmt: skip
        ctrd.run(image, name, *command, keep=True, mounts=[tmp])
        try:
            upper = ctrd.upper_dir(name)
            written = sorted(str(p.relative_to(upper)) for p in upper.rglob("*"))
            assert written == [], f"{command} wrote {written}"
        finally:
            ctrd.remove(name)


# --------------------------------------------------------------------------------------------- postgres


def test_postgres_tools_and_ids(ctrd: PrivateContainerd, built_images: dict[str, images.Built]) -> None:
    script = "postgres --version; pg_basebackup --version; pg_isready --version; id -u postgres; id -g postgres; " \
             "for t in postgres pg_basebackup pg_isready psql; do command -v $t; done"  # fmt: skip
    lines = ctrd.run(images.POSTGRES_IMAGE, "pg-tools", "sh", "-c", script).stdout.splitlines()
    assert all(line.startswith(f"{tool} (PostgreSQL) 15.") for line, tool in
               zip(lines[:3], ("postgres", "pg_basebackup", "pg_isready"), strict=True)), lines  # fmt: skip
    assert lines[3:5] == ["999", "999"]
    assert lines[5:] == [f"/usr/lib/postgresql/15/bin/{t}" for t in ("postgres", "pg_basebackup", "pg_isready", "psql")]
    layer = layer_members(built_images["postgres"].archive)
    run_dir = layer["run/postgresql"]
    assert (run_dir.uid, run_dir.gid, run_dir.mode & 0o7777) == (999, 999, 0o3777)
    assert (layer["var/lib/postgresql/data"].uid, layer["var/lib/postgresql/data"].mode & 0o7777) == (999, 0o1777)
    assert "etc/ssl/private/ssl-cert-snakeoil.key" not in layer
    assert not [n for n in layer if n.startswith("var/lib/postgresql/15/")], "no cluster baked into the image"
    assert not [n for n in layer if n.startswith("dev/") or n.startswith("proc/")]
    for ext in ("pg_cron", "pg_partman"):
        assert f"usr/share/postgresql/15/extension/{ext}.control" in layer


def wait_ready(ctrd: PrivateContainerd, container: str, port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = ctrd.exec(container, "pg_isready", "-q", "-h", "127.0.0.1", "-p", str(port), user="999", check=False)
        if probe.returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{container} not ready on {port}:\n{ctrd.log(container)}")


def psql(ctrd: PrivateContainerd, container: str, sql: str, *, port: int = 5432, db: str = "app",
         user: str = "postgres") -> str:  # fmt: skip
    """psql over TCP with the password (scram-sha-256), from inside `container`."""
    command = f"PGPASSWORD={PASSWORD} psql -X -w -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p {port} -U {user} -d {db}"
    return ctrd.exec(container, "sh", "-c", f'{command} -c "{sql}"', user="999").stdout.strip()


@pytest.fixture(scope="module")
def primary(ctrd: PrivateContainerd, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A primary from the image's entrypoint (root -> postgres), with an initdb.d script, as a user would run it."""
    initdb = tmp_path_factory.mktemp("initdb")
    (initdb / "10-replication.sql").write_text(
        f"CREATE ROLE repl LOGIN REPLICATION PASSWORD '{PASSWORD}';\n"
        "SELECT pg_create_physical_replication_slot('pgscale_imgtest_0');\n"
        "CREATE TABLE t (id int PRIMARY KEY);\n"
    )
    (initdb / "20-hba.sh").write_text('echo "host replication all all scram-sha-256" >> "$PGDATA/pg_hba.conf"\n')
    initdb.chmod(0o755)  # readable by the postgres user, like a ConfigMap volume
    for f in initdb.iterdir():
        f.chmod(0o644)
    name = "pg-primary"
    ctrd.run(images.POSTGRES_IMAGE, name, "docker-entrypoint.sh", "postgres", detach=True,
             env=[f"POSTGRES_PASSWORD={PASSWORD}", "POSTGRES_DB=app"],
             mounts=[f"type=bind,src={initdb},dst=/docker-entrypoint-initdb.d,options=rbind:ro"])  # fmt: skip
    try:
        wait_ready(ctrd, name, 5432)
        yield name
    finally:
        ctrd.remove(name)


def test_postgres_primary_from_the_entrypoint(ctrd: PrivateContainerd, primary: str) -> None:
    assert psql(ctrd, primary, "select current_user, current_database()") == "postgres|app"
    status = ctrd.exec(primary, "sh", "-c", "grep -E '^Uid' /proc/1/status").stdout.split()
    assert status[1] == "999", "the entrypoint dropped root for the postgres user"
    out = psql(ctrd, primary, "create extension pg_partman; select extname from pg_extension order by 1")
    assert "pg_partman" in out.split()
    available = psql(ctrd, primary, "select name from pg_available_extensions where name in ('pg_cron','pg_partman')")
    assert sorted(available.split()) == ["pg_cron", "pg_partman"]


def test_replica_bootstrap_streams_in_the_image(ctrd: PrivateContainerd, primary: str, tmp_path: Path) -> None:
    """pgscale's replica script (from the ConfigMap in a pod) clones the primary and streams, as uid 999."""
    bootstrap = tmp_path / "bootstrap"
    bootstrap.mkdir()
    (bootstrap / "bootstrap.sh").write_text(replicas.bootstrap_script())
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 999, 999)
    name = "pg-replica"
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "imgtest", "app", "uid")
    assert replicas.slot_prefix(owner)  # the real prefix is hashed; this test's slot is made by hand
    ctrd.run(images.POSTGRES_IMAGE, name,
             # runAsUser/runAsGroup 999 of the StatefulSet, and its command
             "setpriv", "--reuid=999", "--regid=999", "--clear-groups", "sh", "/pgscale/bootstrap.sh",
             detach=True, netns_of=primary,
             env=[f"PGDATA={replicas.DATA}/pgdata", "PRIMARY_HOST=127.0.0.1", "PRIMARY_PORT=5432",
                  "SLOT_PREFIX=pgscale_imgtest_", "POD_NAME=app-replica-0", "REPLICATION_USER=repl",
                  f"REPLICATION_PASSWORD={PASSWORD}", "POSTGRES_ARGS=-p 5433"],
             mounts=[f"type=bind,src={bootstrap},dst=/pgscale,options=rbind:ro",
                     f"type=bind,src={data},dst={replicas.DATA},options=rbind:rw",
                     "type=tmpfs,src=tmpfs,dst=/var/run/postgresql,options=nosuid:nodev:mode=1777"])  # fmt: skip
    try:
        wait_ready(ctrd, name, 5433)
        assert psql(ctrd, name, "select pg_is_in_recovery()", port=5433) == "t"
        psql(ctrd, primary, "insert into t values (1), (2), (3)")
        deadline = time.monotonic() + 30
        while psql(ctrd, name, "select count(*) from t", port=5433) != "3":
            assert time.monotonic() < deadline, "rows did not reach the replica"
            time.sleep(0.3)
        assert (
            psql(ctrd, primary, "select active from pg_replication_slots where slot_name = 'pgscale_imgtest_0'") == "t"
        )
    finally:
        ctrd.remove(name)


# -------------------------------------------------------------------------------------------- pgbouncer


def test_pgbouncer_version_as_non_root(ctrd: PrivateContainerd, built_images: dict[str, images.Built]) -> None:
    out = ctrd.run(images.PGBOUNCER_IMAGE, "pgb-version", "sh", "-c", "id -u; pgbouncer --version",
                   read_only=True).stdout.splitlines()  # fmt: skip
    assert out[0] == "65532"
    version = built_images["pgbouncer"].info["labels"]["org.opencontainers.image.version"]
    assert out[1] == f"PgBouncer {version.split('-')[0]}", "the label records the real version"
    assert f"localhost/pgbouncer:{version.split('-')[0]}" in built_images["pgbouncer"].names


def test_pgbouncer_serves_pgscales_config(ctrd: PrivateContainerd, primary: str, tmp_path: Path) -> None:
    """The pooler's command, uid 65532, a read-only root and the rendered config on a read-only mount."""
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "imgtest", "app", "uid")
    spec = PoolingSpec()
    container = pooling.deployment(owner, "app-pooler-rw", spec, images.PGBOUNCER_IMAGE, "s", "h", "rw")
    container = container["spec"]["template"]["spec"]["containers"][0]
    config = tmp_path / "config"
    config.mkdir()
    files: dict[str, Any] = {
        pooling.INI_KEY: pooling.pgbouncer_ini(spec, backend_host="127.0.0.1", backend_port=5432, dbname="app",
                                               listen_port=6432,  # beside the primary in its network namespace
                                               auth_file=f"{pooling.CONFIG_DIR}/{pooling.USERLIST_KEY}"),
        pooling.USERLIST_KEY: pooling.userlist("postgres", PASSWORD),
    }  # fmt: skip
    for key, text in files.items():
        (config / key).write_text(text)
        os.chown(config / key, 0, pooling.RUN_AS_ID)  # the Secret's files: defaultMode 0440, fsGroup
        (config / key).chmod(0o440)
    name = "pgb-serve"
    ctrd.run(images.PGBOUNCER_IMAGE, name, *container["command"], detach=True, read_only=True, netns_of=primary,
             mounts=[f"type=bind,src={config},dst={pooling.CONFIG_DIR},options=rbind:ro"])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            probe = ctrd.exec(primary, "pg_isready", "-q", "-h", "127.0.0.1", "-p", "6432", check=False)
            if probe.returncode == 0:
                break
            assert time.monotonic() < deadline, f"pgbouncer not listening:\n{ctrd.log(name)}"
            time.sleep(0.3)
        assert psql(ctrd, primary, "select current_database(), 41 + 1", port=6432) == "app|42"
        status = ctrd.exec(name, "sh", "-c", "grep -E '^Uid' /proc/1/status").stdout.split()
        assert status[1] == str(pooling.RUN_AS_ID)
    finally:
        ctrd.remove(name)
    assert json.dumps(container["securityContext"]["readOnlyRootFilesystem"]) == "true"


# ------------------------------------------------------------------------------------------ redis-server


def test_redis_serves_a_caches_config_read_only(
    ctrd: PrivateContainerd, built_images: dict[str, images.Built], tmp_path: Path
) -> None:
    """The Cache's container args alone (the entrypoint starts redis-server), its config and auth.conf
    mounted read-only as the ConfigMap and Secret are, /data writable, uid 65532, a read-only root."""
    built = built_images["redis"]
    version = built.info["labels"]["org.opencontainers.image.version"]
    assert f"localhost/redis-server:{version.split(':')[-1].split('-')[0]}" in built.names
    owner = ObjectRef("pgscale.io/v1alpha1", "Cache", "imgtest", "tasks", "uid")
    spec = CacheSpec.model_validate({"profileRef": {"name": "app"}, "image": images.REDIS_IMAGE})
    pod = cache_specs.deployment(owner, spec, memory_bytes=256 * 2**20, config_hash="h")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    uid = pod["securityContext"]["runAsUser"]
    files = {
        cache_specs.CONFIG_DIR: (cache_specs.CONFIG_KEY, cache_specs.server_config(spec, maxmemory_bytes=64 * 2**20)),
        cache_specs.AUTH_DIR: (cache_specs.AUTH_KEY, cache_specs.auth_config(PASSWORD.replace("-", ""))),
    }
    mounts = []
    for target, (key, text) in files.items():
        src = tmp_path / target.strip("/").replace("/", "-")
        src.mkdir()
        (src / key).write_text(text)
        os.chown(src / key, 0, uid)  # a Secret's files: defaultMode 0440, group fsGroup
        (src / key).chmod(0o440)
        mounts.append(f"type=bind,src={src},dst={target},options=rbind:ro")
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, uid, uid)
    mounts.append(f"type=bind,src={data},dst={cache_specs.DATA_DIR},options=rbind:rw")
    name = "redis-serve"
    password = PASSWORD.replace("-", "")

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return ctrd.exec(name, "redis-cli", "--no-auth-warning", *args, check=False)

    # `ctr run` replaces the entrypoint with its command; the kubelet keeps it and passes `args` to it.
    entrypoint = images.read_archive(built.archive)["config"]["config"]["Entrypoint"]
    ctrd.run(images.REDIS_IMAGE, name, *entrypoint, *container["args"], detach=True, read_only=True, mounts=mounts)
    try:
        deadline = time.monotonic() + 30
        while (ping := cli("-a", password, "ping")).stdout.strip() != "PONG":
            assert time.monotonic() < deadline, (
                f"redis-server not answering: {ping.stdout}{ping.stderr}{ctrd.log(name)}"
            )
            time.sleep(0.3)
        assert cli("-a", password, "config", "get", "maxmemory").stdout.split() == ["maxmemory", str(64 * 2**20)]
        assert "NOAUTH" in cli("ping").stdout
        status = ctrd.exec(name, "sh", "-c", "grep -E '^Uid' /proc/1/status").stdout
        assert status.split()[1] == str(uid), status
    finally:
        ctrd.remove(name)
