"""The container images pgscale's pods run, built on this machine without a registry.

No registry is reachable here, so every image a pod names must already be in the node's
containerd: this module builds them as OCI archives for `ctr -n k8s.io images import`, under
the names the chart and the operator's defaults use, so nothing in a pod spec is changed for
the tests:

- the operator, `pgscale:<version>` (PGSCALE_IMAGE's default) and
  `ghcr.io/pgscale/pgscale:<appVersion>` (the chart's image), built by buildah from the
  project's own Dockerfile, unchanged. Its base `python:3.11-slim-bookworm` cannot be pulled,
  so a stand-in is built from Debian's python3 3.11 (below) and committed into buildah's
  local storage under that name; `buildah bud --pull=never` then uses it.
- `postgres:15` (PGSCALE_POSTGRES_IMAGE's default, what replica pods run): Debian's
  postgresql-15 with pg_cron and pg_partman, laid out like the official image where pgscale
  relies on it (uid/gid 999 `postgres`, binaries on PATH, /var/run/postgresql writable, a
  small docker-entrypoint.sh for a primary).
- `pgbouncer/pgbouncer:1.24.1` (PGSCALE_PGBOUNCER_IMAGE's default): Debian's pgbouncer
  package, which in bookworm is 1.18, so the tag overstates the version. The real one is in
  the `org.opencontainers.image.version` label, and the same image is also named
  `localhost/pgbouncer:<real version>`, an honest name a harness can put in
  PGSCALE_PGBOUNCER_IMAGE.
- `pgscale.local/redis-server:1` (also `localhost/redis-server:<version>`): Debian's
  redis-server for a Cache's server pod (`spec.image`), with the official valkey/redis
  images' entrypoint rule (a `*.conf` argument starts the server with it), user 65532.

Root filesystems come from mmdebstrap with the Debian mirror and suites of this machine's
apt sources. Every image is cached as `<cache>/images/<slug>-<key>.tar` (plus a `.json`
with its names, inputs, package versions, build time and size), where the key hashes all
its inputs: the package list and image config, the apt sources, mmdebstrap's or buildah's
version, this file and hack/ociarchive.py, and for the operator the Dockerfile, uv.lock,
pyproject.toml, README.md and every file under operator/. An image is rebuilt only when its
key changes. Needs root (mmdebstrap and buildah in root mode).

    uv run python hack/images.py build     # build what is missing; print names, archives, sizes, times
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import ociarchive

ROOT = Path(__file__).resolve().parent.parent
_XDG_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("PGSCALE_CACHE", _XDG_CACHE / "pgscale")) / "images"  # as hack/build-*.sh
# buildah's image store: outside the checkout, kept between builds for the base stand-in.
BUILDAH_ROOT = CACHE / "buildah" / "storage"
BUILDAH_RUNROOT = CACHE / "buildah" / "run"
# overlay: each build step stores only its changes (vfs copies the whole tree per step,
# ~2.5 GB and a minute of copying per operator build).
BUILDAH_DRIVER = "overlay"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# Files of the build context the Dockerfile reads (COPY); tests/unit/test_images_dockerfile.py
# checks every COPY source is among them.
CONTEXT_FILES = ("Dockerfile", ".dockerignore", "pyproject.toml", "uv.lock", "README.md")
CONTEXT_DIRS = ("operator",)
PRUNE_AFTER_SECONDS = 24 * 3600
_IGNORED_PARTS = frozenset({"__pycache__", ".mypy_cache", ".pytest_cache", ".ruff_cache"})

# Names, as pods spell them (the kubelet asks containerd for normalize(name)).
BASE_IMAGE = "python:3.11-slim-bookworm"
POSTGRES_IMAGE = "postgres:15"
PGBOUNCER_IMAGE = "pgbouncer/pgbouncer:1.24.1"
# Not the Cache's default (valkey/valkey:8.1, which cannot be pulled here): a Cache names it in spec.image.
REDIS_IMAGE = "pgscale.local/redis-server:1"


def operator_names() -> tuple[str, str]:
    """`pgscale:<pyproject version>` (the operator's default PGSCALE_IMAGE) and the chart's image."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    chart = (ROOT / "charts" / "pgscale" / "Chart.yaml").read_text()
    app = re.search(r'^appVersion:\s*"?([^"\s]+)"?\s*$', chart, re.M)
    repo = re.search(r"^\s+repository:\s*(\S+)\s*$", (ROOT / "charts" / "pgscale" / "values.yaml").read_text(), re.M)
    if not app or not repo:
        raise RuntimeError("charts/pgscale: appVersion or image.repository not found")
    return f"pgscale:{version}", f"{repo.group(1)}:{app.group(1)}"


class BuildError(RuntimeError):
    """A build step failed; the message ends with the tail of its log."""


# ------------------------------------------------------------------------------------------- names


def normalize(name: str) -> str:
    """The fully qualified reference containerd stores and the kubelet looks up.

    Docker's rules: a first component with a dot or colon, or `localhost`, is a registry;
    otherwise the registry is docker.io and a single component gets `library/`.

    >>> normalize("postgres:15")
    'docker.io/library/postgres:15'
    >>> normalize("pgbouncer/pgbouncer:1.24.1")
    'docker.io/pgbouncer/pgbouncer:1.24.1'
    >>> normalize("ghcr.io/pgscale/pgscale:0.1.0")
    'ghcr.io/pgscale/pgscale:0.1.0'
    """
    if not re.fullmatch(r"([a-z0-9.-]+(:\d+)?/)?[a-z0-9][a-z0-9._/-]*(:\w[\w.-]*)?(@sha256:[0-9a-f]{64})?", name):
        raise ValueError(f"not an image reference: {name!r}")
    first, _, rest = name.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, rest
    else:
        registry, path = "docker.io", name
    if registry == "docker.io" and "/" not in path.split("@")[0].rsplit(":", 1)[0]:
        path = f"library/{path}"
    if ":" not in path.rsplit("/", 1)[-1] and "@" not in path:
        raise ValueError(f"{name!r} has no tag: imported images are never pulled, and :latest always is")
    return f"{registry}/{path}"


def rename_archive(archive: Path, names: Sequence[str], out: Path, config: Mapping[str, Any] | None = None) -> str:
    """Copy a single-image OCI archive to `out` with one index entry per name (normalized).

    `ctr images import` names an image after the entry's `io.containerd.image.name`
    annotation; `buildah push` sets only `org.opencontainers.image.ref.name`, and
    ociarchive.write_oci_archive takes one name. `config` entries are merged into the image
    config's `config` object (for fields the writer lacks: ExposedPorts, StopSignal), which
    gives the image a new config and manifest. Blobs are copied as they are. Returns the
    manifest digest.
    """
    if not names:
        raise ValueError("an image needs at least one name")
    with tarfile.open(archive) as src:
        members = {m.name.removeprefix("./"): m for m in src.getmembers()}

        def read(name: str) -> bytes:
            f = src.extractfile(members[name])
            if f is None:
                raise KeyError(name)
            return f.read()

        index = json.loads(read("index.json"))
        if len({m["digest"] for m in index["manifests"]}) != 1:
            raise ValueError(f"{archive}: expected one image in the index")
        manifest_desc = {k: index["manifests"][0][k] for k in ("mediaType", "digest", "size")}
        replaced: dict[str, bytes] = {}
        dropped: set[str] = set()
        if config:
            manifest = json.loads(read(_blob(manifest_desc["digest"])))
            dropped = {_blob(manifest_desc["digest"]), _blob(manifest["config"]["digest"])}
            image_config = json.loads(read(_blob(manifest["config"]["digest"])))
            image_config["config"] = {**image_config.get("config", {}), **config}
            config_bytes = json.dumps(image_config, sort_keys=True, separators=(",", ":")).encode()
            manifest["config"] = {**manifest["config"], "digest": _sha(config_bytes), "size": len(config_bytes)}
            manifest_bytes = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
            manifest_desc = {**manifest_desc, "digest": _sha(manifest_bytes), "size": len(manifest_bytes)}
            replaced = {_blob(_sha(config_bytes)): config_bytes, _blob(_sha(manifest_bytes)): manifest_bytes}
        entries = []
        for name in names:
            full = normalize(name)
            tag = full.rsplit("/", 1)[-1].split("@")[0].rsplit(":", 1)[-1]
            entries.append({**manifest_desc, "annotations": {"io.containerd.image.name": full,
                                                             "org.opencontainers.image.ref.name": tag}})  # fmt: skip
        new_index = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                                "manifests": entries}, sort_keys=True, separators=(",", ":")).encode()  # fmt: skip
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as tmp:
            try:
                with tarfile.open(fileobj=tmp, mode="w", format=tarfile.PAX_FORMAT) as dst:
                    for name, member in members.items():
                        if name == "index.json" or name in replaced or name in dropped:
                            continue
                        member.name = name
                        dst.addfile(member, src.extractfile(member) if member.isreg() else None)
                    for name, data in [*replaced.items(), ("index.json", new_index)]:
                        info = tarfile.TarInfo(name)
                        info.size, info.mode = len(data), 0o644
                        dst.addfile(info, io.BytesIO(data))
                tmp.flush()
                os.chmod(tmp.name, 0o644)
                os.replace(tmp.name, out)
            except BaseException:
                Path(tmp.name).unlink(missing_ok=True)
                raise
    return str(manifest_desc["digest"])


def read_archive(archive: Path) -> dict[str, Any]:
    """Index, manifest and image config of a single-image OCI archive (for checks and tests)."""
    with tarfile.open(archive) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}

        def read(name: str) -> Any:
            f = tar.extractfile(members[name])
            if f is None:
                raise KeyError(name)
            return json.loads(f.read())

        index = read("index.json")
        manifest = read(_blob(index["manifests"][0]["digest"]))
        return {"index": index, "manifest": manifest, "config": read(_blob(manifest["config"]["digest"]))}


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


# ------------------------------------------------------------------------------------ apt sources


def apt_sources(root: Path = Path("/")) -> tuple[str, list[str]]:
    """This machine's Debian suite and its Debian sources as one-line `deb URI SUITE COMPONENTS`.

    The images use the same mirror and suites as apt here (a mirror reachable from this
    machine, packages of the same point release as the host's PostgreSQL). Read from
    sources.list and sources.list.d (one-line and deb822 formats); kept are `deb` entries
    for the host's codename, -updates and -security with Debian's components only, so
    third-party repositories (other suites such as `nodistro`, or components such as
    `stable`) and backports stay out.
    """
    codename = ""
    for line in (root / "etc/os-release").read_text().splitlines():
        if line.startswith("VERSION_CODENAME="):
            codename = line.split("=", 1)[1].strip().strip('"')
    if not codename:
        raise RuntimeError("no VERSION_CODENAME in /etc/os-release: not a Debian release?")
    suites = {codename, f"{codename}-updates", f"{codename}-security"}
    components = {"main", "contrib", "non-free", "non-free-firmware"}
    entries: list[tuple[str, str, list[str]]] = []
    apt = root / "etc/apt"
    files = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*"))]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text()
        if path.name.endswith(".sources"):
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {}
                key = ""
                for raw in stanza.splitlines():
                    if raw.startswith("#") or not raw.strip():
                        continue
                    if raw[0].isspace() and key:
                        fields[key] += " " + raw.strip()
                        continue
                    key, _, value = raw.partition(":")
                    key = key.strip().lower()
                    fields[key] = value.strip()
                if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                    continue
                for uri in fields.get("uris", "").split():
                    for suite in fields.get("suites", "").split():
                        entries.append((uri, suite, fields.get("components", "").split()))
        elif path.name.endswith(".list"):
            for raw in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", raw.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb":
                    entries.append((words[1], words[2], words[3:]))
    lines = []
    for uri, suite, comps in entries:
        kept = [c for c in comps if c in components]
        line = f"deb {uri.rstrip('/')} {suite} {' '.join(kept)}"
        if suite in suites and kept and line not in lines:
            lines.append(line)
    if not any(line.split()[2] == codename for line in lines):
        raise RuntimeError(f"no Debian source for {codename} in {apt}")
    return codename, lines


# -------------------------------------------------------------------------------------- recipes


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """A root filesystem from Debian packages (mmdebstrap) and its image config."""

    slug: str
    names: tuple[str, ...]
    packages: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cmd: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    user: str | None = None
    workdir: str | None = None
    labels: tuple[tuple[str, str], ...] = ()
    exposed_ports: tuple[str, ...] = ()
    stop_signal: str | None = None
    # Shell run by mmdebstrap after the essential packages, before the rest ("$1" is the root).
    essential_hook: str | None = None
    # Shell run inside the finished root filesystem (chroot), as root.
    finish: str | None = None
    # The package whose version the image carries in org.opencontainers.image.version.
    version_package: str | None = None
    # Extra name `localhost/<name>:<upstream version of version_package>`.
    versioned_alias: str | None = None
    # Title, source, version and cache-key labels. Off for a base image: images built FROM
    # it would inherit them and claim its version as theirs.
    standard_labels: bool = True


def _described(text: str) -> tuple[tuple[str, str], ...]:
    return (("org.opencontainers.image.description", f"{text}; built by pgscale's hack/images.py"),)


PYTHON_BASE = DebianImage(
    slug="python-base",
    names=(BASE_IMAGE,),
    # What the Dockerfile uses of python:3.11-slim-bookworm: python3 3.11 as `python3` and
    # `python`, pip (for `pip install uv`), CA certificates; no EXTERNALLY-MANAGED marker
    # (the official image has none, so its `pip install` into the system works).
    packages=("python3", "python3-pip", "python-is-python3", "ca-certificates"),
    env=(("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8")),
    cmd=("python3",),
    finish="rm -f /usr/lib/python3.*/EXTERNALLY-MANAGED",
    standard_labels=False,
    labels=_described("Stand-in for python:3.11-slim-bookworm from Debian's python3"),
)

# The official postgres image's entrypoint, reduced to what a single primary needs: when the
# command is `postgres` and the data directory is empty, initdb with POSTGRES_USER /
# POSTGRES_PASSWORD / POSTGRES_DB / POSTGRES_INITDB_ARGS, listening on every address with
# POSTGRES_HOST_AUTH_METHOD (scram-sha-256), then /docker-entrypoint-initdb.d/*.sql and *.sh
# against a server listening on its socket only; as root it first drops to the postgres user
# (setpriv, from util-linux).
POSTGRES_ENTRYPOINT = r"""#!/bin/sh
# A subset of the official postgres image's docker-entrypoint.sh (hack/images.py).
set -eu
case "${1:-}" in -*) set -- postgres "$@" ;; esac
if [ "${1:-}" = postgres ]; then
  if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /var/run/postgresql
    chown postgres:postgres "$PGDATA" /var/run/postgresql
    chmod 700 "$PGDATA"
    chmod 3777 /var/run/postgresql
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
  fi
  if [ ! -s "$PGDATA/PG_VERSION" ]; then
    : "${POSTGRES_PASSWORD:?POSTGRES_PASSWORD is needed to initialize the database}"
    user="${POSTGRES_USER:-postgres}"
    db="${POSTGRES_DB:-$user}"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    # shellcheck disable=SC2086 # a list of options
    initdb -D "$PGDATA" --username="$user" --pwfile="$pwfile" --auth-local=trust \
      --auth-host=scram-sha-256 ${POSTGRES_INITDB_ARGS:-}
    rm -f "$pwfile"
    echo "host all all all ${POSTGRES_HOST_AUTH_METHOD:-scram-sha-256}" >> "$PGDATA/pg_hba.conf"
    echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
    pg_ctl -D "$PGDATA" -o "-c listen_addresses=''" -w start
    if [ "$db" != postgres ]; then
      psql -v ON_ERROR_STOP=1 -U "$user" -d postgres -c "CREATE DATABASE \"$db\""
    fi
    for f in /docker-entrypoint-initdb.d/*; do
      case "$f" in
        *.sh) echo "$0: running $f"; . "$f" ;;
        *.sql) echo "$0: running $f"; psql -v ON_ERROR_STOP=1 -U "$user" -d "$db" -f "$f" ;;
      esac
    done
    pg_ctl -D "$PGDATA" -m fast -w stop
  fi
fi
exec "$@"
"""

POSTGRES = DebianImage(
    slug="postgres",
    names=(POSTGRES_IMAGE,),
    packages=("postgresql-15", "postgresql-15-cron", "postgresql-15-partman", "postgresql-contrib"),
    env=(
        ("PATH", f"/usr/lib/postgresql/15/bin:{DEFAULT_PATH}"),
        ("LANG", "C.UTF-8"),
        ("PGDATA", "/var/lib/postgresql/data"),
    ),
    entrypoint=("docker-entrypoint.sh",),
    cmd=("postgres",),
    exposed_ports=("5432/tcp",),
    stop_signal="SIGINT",
    # The official image's ids: created before postgresql-common's postinst, which then
    # keeps them instead of picking a free system uid.
    essential_hook=(
        'echo "postgres:x:999:" >> "$1/etc/group" && '
        'echo "postgres:x:999:999:PostgreSQL administrator:/var/lib/postgresql:/bin/bash" >> "$1/etc/passwd"'
    ),
    finish="""
        pg_dropcluster 15 main 2>/dev/null || true
        rm -rf /etc/postgresql/15 /var/lib/postgresql/15 /var/log/postgresql/*
        # Debian's postinst makes a snakeoil key pair: no private key ships in an image.
        rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
        mkdir -p /run/postgresql /var/lib/postgresql/data
        chown 999:999 /run/postgresql /var/lib/postgresql /var/lib/postgresql/data
        chmod 3777 /run/postgresql
        chmod 1777 /var/lib/postgresql/data
        test "$(id -u postgres):$(id -g postgres)" = 999:999
        cat > /usr/local/bin/docker-entrypoint.sh
        chmod 755 /usr/local/bin/docker-entrypoint.sh
    """,
    version_package="postgresql-15",
    labels=_described("PostgreSQL 15 with pg_cron and pg_partman from Debian packages"),
)

PGBOUNCER = DebianImage(
    slug="pgbouncer",
    names=(PGBOUNCER_IMAGE,),
    packages=("pgbouncer",),
    env=(("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8")),
    cmd=("pgbouncer", "/etc/pgbouncer/pgbouncer.ini"),
    # pgscale's pooler pods run as 65532 (specs/pooling.py RUN_AS_ID); the image does too.
    user="65532:65532",
    exposed_ports=("5432/tcp",),
    finish="""
        groupadd --gid 65532 nonroot
        useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
        rm -f /etc/ssl/private/ssl-cert-snakeoil.key /etc/ssl/certs/ssl-cert-snakeoil.pem
        rm -rf /var/log/postgresql/*
    """,
    version_package="pgbouncer",
    versioned_alias="localhost/pgbouncer",
    labels=_described(
        "PgBouncer from Debian's pgbouncer package (the version label is the real one: the "
        "pgbouncer/pgbouncer tag is the name pgscale's default expects)"
    ),
)

# The official valkey and redis images' entrypoint rule: a first argument that is a config file
# (`*.conf`) or a flag starts the server with it. A Cache's pod passes only its config file.
REDIS_ENTRYPOINT = r"""#!/bin/sh
# As the official valkey/redis images' docker-entrypoint.sh, without the root-only chown (hack/images.py).
set -eu
case "${1:-}" in -*|*.conf) set -- redis-server "$@" ;; esac
exec "$@"
"""

REDIS = DebianImage(
    slug="redis",
    names=(REDIS_IMAGE,),
    packages=("redis-server",),
    env=(("PATH", DEFAULT_PATH), ("LANG", "C.UTF-8")),
    entrypoint=("docker-entrypoint.sh",),
    cmd=("redis-server",),
    # pgscale's cache pods run as 65532 (specs/cache.py, RUN_AS_ID); the image does too.
    user="65532:65532",
    workdir="/data",
    exposed_ports=("6379/tcp",),
    finish="""
        groupadd --gid 65532 nonroot
        useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin nonroot
        # Debian's config and its directories are the package's service's; a pod mounts its own config.
        rm -rf /var/log/redis/* /var/lib/redis/*
        mkdir -p /data
        chown 65532:65532 /data
        cat > /usr/local/bin/docker-entrypoint.sh
        chmod 755 /usr/local/bin/docker-entrypoint.sh
    """,
    version_package="redis-server",
    versioned_alias="localhost/redis-server",
    labels=_described("redis-server from Debian's package, laid out as valkey/valkey and redis are for a Cache"),
)

RECIPES = (PYTHON_BASE, POSTGRES, PGBOUNCER, REDIS)
_STDIN = {"postgres": POSTGRES_ENTRYPOINT, "redis": REDIS_ENTRYPOINT}


@dataclasses.dataclass(frozen=True)
class Built:
    """One cached image: its names, archive and what its .json records."""

    slug: str
    names: tuple[str, ...]
    archive: Path
    key: str
    info: dict[str, Any]
    cached: bool


# ------------------------------------------------------------------------------------ machinery


_mmdebstrap_lock = threading.Lock()  # one at a time: they share the .deb cache


def _tool_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    if out.returncode != 0:
        raise BuildError(f"{package} is not installed (hack/setup.sh installs it)")
    return out.stdout.strip()


def _script_digest() -> str:
    h = hashlib.sha256()
    for path in (Path(__file__), Path(ociarchive.__file__)):
        h.update(path.read_bytes())
    return h.hexdigest()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def recipe_key(recipe: DebianImage, sources: Sequence[str], mmdebstrap_version: str | None = None) -> str:
    """The cache key of a Debian image: recipe, apt sources, mmdebstrap version, this script."""
    tool = mmdebstrap_version or _tool_version("mmdebstrap")
    return _key("debian", dataclasses.asdict(recipe), _STDIN.get(recipe.slug), list(sources), tool, _script_digest())


def context_files(root: Path = ROOT) -> list[str]:
    """The build context the operator image is built from: CONTEXT_FILES and CONTEXT_DIRS' files.

    Caches (__pycache__ and the like) are left out, as .dockerignore leaves them out.
    """
    files = [name for name in CONTEXT_FILES if (root / name).is_file()]
    for top in CONTEXT_DIRS:
        for dirpath, dirnames, filenames in os.walk(root / top):
            dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_PARTS)
            for name in sorted(filenames):
                if not name.endswith((".pyc", ".pyo")):
                    files.append((Path(dirpath) / name).relative_to(root).as_posix())
    return files


def operator_key(base_key: str, root: Path = ROOT, buildah_version: str | None = None) -> str:
    """The cache key of the operator image: its base, every context file, buildah's version, this script."""
    h = hashlib.sha256()
    for name in context_files(root):
        data = (root / name).read_bytes()
        h.update(f"{name}\0{len(data)}\0".encode() + data)
    tool = buildah_version or _tool_version("buildah")
    return _key("operator", base_key, operator_names(), h.hexdigest(), tool, _script_digest())


def _log_tail(log: Path, lines: int = 40) -> str:
    if not log.exists():
        return ""
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _run(args: Sequence[str], log: Path, *, stdin: str | None = None, env: Mapping[str, str] | None = None,
         timeout: float = 1800) -> None:  # fmt: skip
    """Run a build step with its output appended to `log`; fail with the log's tail."""
    with log.open("a") as out:
        out.write(f"\n$ {' '.join(args)}\n")
        out.flush()
        result = subprocess.run(list(args), input=stdin, text=True, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip
    if result.returncode != 0:
        raise BuildError(f"{args[0]} failed ({result.returncode}); {log}:\n{_log_tail(log)}")


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path.resolve()) + "/"
    mounts = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if point.startswith(prefix) or point == prefix[:-1]:
            mounts.append(point)
    return mounts


def _remove_tree(path: Path) -> None:
    """Delete a build's root filesystem, never through a mount a failed build left in it."""
    if not path.exists():
        return
    mounts = _mounts_under(path)
    for point in sorted(mounts, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False)
    if _mounts_under(path):
        raise BuildError(f"{path} still has mounts {mounts}; not deleting it")
    shutil.rmtree(path)


def _package_versions(rootfs: Path) -> dict[str, str]:
    query = ["chroot", str(rootfs), "dpkg-query", "-W", "-f=${Package}\t${Version}\n"]
    out = subprocess.run(query, check=True, capture_output=True, text=True).stdout
    return dict(line.split("\t", 1) for line in out.splitlines())


def _dir_size(path: Path) -> int:
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += (Path(dirpath) / name).lstat().st_size
    return total


def _prune(slug: str, keep: Path) -> None:
    """Drop this image's archives unused for a day, but always keep the current one and one more.

    Several checkouts (worktrees, branches) share the cache with different keys; a day of
    grace keeps them from rebuilding each other's images. Use is the .json's mtime, touched
    on every cache hit.
    """
    pattern = re.compile(rf"{re.escape(slug)}-[0-9a-f]{{16}}\.tar")
    olds = [p for p in CACHE.glob(f"{slug}-*.tar") if p != keep and pattern.fullmatch(p.name)]

    def used(archive: Path) -> float:
        meta = archive.with_suffix(".json")
        return meta.stat().st_mtime if meta.exists() else archive.stat().st_mtime

    olds.sort(key=used, reverse=True)
    for old in olds[1:]:
        if time.time() - used(old) > PRUNE_AFTER_SECONDS:
            old.unlink(missing_ok=True)
            old.with_suffix(".json").unlink(missing_ok=True)


def _cached(slug: str, key: str) -> Built | None:
    archive, meta = CACHE / f"{slug}-{key}.tar", CACHE / f"{slug}-{key}.json"
    if archive.is_file() and meta.is_file():
        os.utime(meta)  # in use (see _prune)
        info = json.loads(meta.read_text())
        return Built(slug, tuple(info["names"]), archive, key, info, cached=True)
    return None


def _record(slug: str, key: str, names: Sequence[str], info: dict[str, Any]) -> Built:
    archive = CACHE / f"{slug}-{key}.tar"
    info = {"names": list(names), "key": key, "archive_bytes": archive.stat().st_size, **info}
    meta = CACHE / f"{slug}-{key}.json"
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    tmp.replace(meta)
    _prune(slug, archive)
    return Built(slug, tuple(names), archive, key, info, cached=False)


# ------------------------------------------------------------------------------- Debian images


def build_debian(recipe: DebianImage, *, force: bool = False) -> Built:
    """The image of `recipe`, from the cache or built with mmdebstrap (about 30-60 s)."""
    suite, sources = apt_sources()
    key = recipe_key(recipe, sources)
    if not force and (hit := _cached(recipe.slug, key)):
        return hit
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "logs").mkdir(exist_ok=True)
    log = CACHE / "logs" / f"{recipe.slug}.log"
    log.write_text(f"{recipe.slug} {key}\n")
    print(f"images: building {recipe.slug} ({', '.join(recipe.names)}) with mmdebstrap; log {log}", file=sys.stderr)
    debs = CACHE / "debs"  # downloaded packages, reused by later builds
    debs.mkdir(exist_ok=True)
    rootfs = CACHE / "work" / f"{recipe.slug}-{os.getpid()}"
    start, waited = time.monotonic(), 0.0
    _remove_tree(rootfs)
    rootfs.parent.mkdir(parents=True, exist_ok=True)
    try:
        args = [
            # A private mount namespace: the /dev, /proc and /sys mmdebstrap mounts into the root
            # filesystem can never propagate to the host's (a tmpfs once landed on the host's
            # /dev/shm and broke every Postgres started before it).
            "unshare", "--mount", "--propagation", "private",
            "mmdebstrap", "--variant=minbase", "--mode=root", "--format=directory",
            # usr-is-merged in the essential phase: otherwise apt satisfies init-system-helpers'
            # "usrmerge | usr-is-merged" with usrmerge, which drags perl in (+50 MB).
            "--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr",
            '--aptopt=APT::Install-Recommends "false"',
            "--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/info/*",
            "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-include=/usr/share/doc/*/copyright",
            "--dpkgopt=path-exclude=/usr/share/locale/*", "--dpkgopt=path-exclude=/usr/share/lintian/*",
            f"--include={','.join(recipe.packages)}",
            "--skip=essential/unlink",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives/',
            f"--setup-hook=sync-in {debs} /var/cache/apt/archives/",
        ]  # fmt: skip
        if recipe.essential_hook:
            args.append(f"--essential-hook={recipe.essential_hook}")
        args += [
            f"--customize-hook=sync-out /var/cache/apt/archives {debs}",
            '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/* "$1"/var/log/*.log '
            '"$1"/var/log/apt/* "$1"/var/cache/debconf/*-old "$1"/var/lib/dpkg/*-old',
            suite, str(rootfs), *sources,
        ]  # fmt: skip
        asked = time.monotonic()
        with _mmdebstrap_lock:
            waited = time.monotonic() - asked
            _run(args, log)
        if mounts := _mounts_under(rootfs):
            raise BuildError(f"mmdebstrap left mounts under {rootfs}: {mounts}")
        if recipe.finish:
            _run(["chroot", str(rootfs), "/bin/sh", "-ec", recipe.finish], log, stdin=_STDIN.get(recipe.slug),
                 env={"PATH": DEFAULT_PATH})  # fmt: skip
        # A runtime mounts its own /dev, /proc, /sys, resolv.conf and hostname; the host's
        # copies stay out of the image (removed after `finish`, which may need /dev/null).
        for sub in ("dev", "proc", "sys"):
            for entry in (rootfs / sub).iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        for name in ("etc/resolv.conf", "etc/hostname"):
            (rootfs / name).unlink(missing_ok=True)
        versions = _package_versions(rootfs)
        names = list(recipe.names)
        labels = dict(recipe.labels)
        if recipe.standard_labels:
            labels.update({
                "org.opencontainers.image.title": recipe.names[0].rsplit("/", 1)[-1].split(":")[0],
                "org.opencontainers.image.source": f"Debian {suite}: {', '.join(recipe.packages)}",
                "io.pgscale.image.key": key,
            })  # fmt: skip
        if recipe.version_package:
            version = versions[recipe.version_package]
            if recipe.standard_labels:
                labels["org.opencontainers.image.version"] = version
            if recipe.versioned_alias:
                upstream = re.sub(r"^\d+:", "", version).split("-")[0].split("+")[0]
                names.append(f"{recipe.versioned_alias}:{upstream}")
        rootfs_bytes = _dir_size(rootfs)
        plain = CACHE / "work" / f"{recipe.slug}-{os.getpid()}.tar"
        ociarchive.write_oci_archive(
            rootfs, plain, normalize(names[0]), entrypoint=recipe.entrypoint, cmd=recipe.cmd, env=dict(recipe.env),
            user=recipe.user, workdir=recipe.workdir, labels=labels,
        )  # fmt: skip
        extra: dict[str, Any] = {}
        if recipe.exposed_ports:
            extra["ExposedPorts"] = {port: {} for port in recipe.exposed_ports}
        if recipe.stop_signal:
            extra["StopSignal"] = recipe.stop_signal
        try:
            rename_archive(plain, names, CACHE / f"{recipe.slug}-{key}.tar", config=extra)
        finally:
            plain.unlink(missing_ok=True)
    finally:
        _remove_tree(rootfs)
    seconds = round(time.monotonic() - start - waited, 1)  # not counting the wait for another mmdebstrap
    return _record(recipe.slug, key, names, {
        "build_seconds": seconds, "rootfs_bytes": rootfs_bytes, "packages": versions, "sources": sources,
        "labels": labels,
    })  # fmt: skip


# ---------------------------------------------------------------------------------- the operator


def buildah(*args: str) -> list[str]:
    """A buildah command on pgscale's own image store (never the machine's /var/lib/containers)."""
    return ["buildah", "--root", str(BUILDAH_ROOT), "--runroot", str(BUILDAH_RUNROOT),
            "--storage-driver", BUILDAH_DRIVER, *args]  # fmt: skip


def _buildah_image_id(name: str) -> str | None:
    out = subprocess.run(buildah("images", "--no-trunc", "--format", "{{.ID}}", normalize(name)),
                         capture_output=True, text=True)  # fmt: skip
    ids = out.stdout.split()
    return ids[0].removeprefix("sha256:") if out.returncode == 0 and ids else None


def _install_base(base: Built, log: Path) -> None:
    """Put the stand-in base image into buildah's store under its official name (if not there yet)."""
    config_digest = read_archive(base.archive)["manifest"]["config"]["digest"].split(":", 1)[1]
    if _buildah_image_id(BASE_IMAGE) == config_digest:
        return
    subprocess.run(buildah("rmi", "--force", normalize(BASE_IMAGE)), capture_output=True)
    _run(buildah("pull", f"oci-archive:{base.archive}"), log)
    _run(buildah("tag", config_digest, normalize(BASE_IMAGE)), log)


def build_operator(base: Built, *, force: bool = False) -> Built:
    """The operator image built by `buildah bud` from the project's Dockerfile (about 1-2 min).

    The build runs in a copy of the context files (context_files(): what the key covers,
    nothing a developer's checkout has beside them). Build-time only mounts, which never
    reach the runtime stage (it has no RUN): this machine's CA bundle and a uv config
    trusting it (egress may pass a TLS-inspecting proxy whose CA is only in the system
    store; uv otherwise uses its own roots), and a uv cache so a rebuild after a source
    change downloads nothing.
    """
    key = operator_key(base.key)
    names = operator_names()
    if not force and (hit := _cached("operator", key)):
        return hit
    log = CACHE / "logs" / "operator.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(f"operator {key}\n")
    print(f"images: building operator ({', '.join(names)}) with buildah from the Dockerfile; log {log}",
          file=sys.stderr)  # fmt: skip
    start = time.monotonic()
    for d in (BUILDAH_ROOT, BUILDAH_RUNROOT):
        d.mkdir(parents=True, exist_ok=True)
    _install_base(base, log)
    work = CACHE / "work" / f"operator-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    context = work / "context"
    for name in context_files():
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    uv_config = work / "uv.toml"
    uv_config.write_text("system-certs = true\n")
    uv_cache = CACHE / "buildah" / "uv-cache"
    uv_cache.mkdir(parents=True, exist_ok=True)
    tag = f"localhost/pgscale-build:{key}"
    mounts = [f"{uv_config}:/etc/uv/uv.toml:ro", f"{uv_cache}:/root/.cache/uv"]
    ca = Path("/etc/ssl/certs/ca-certificates.crt")
    if ca.is_file():
        mounts.append(f"{ca}:{ca}:ro")
    try:
        _run(buildah("bud", "--pull=never", "--isolation=chroot", "--network=host", "--layers=false",
                     *(f"--volume={m}" for m in mounts), "--tag", tag, str(context)), log)  # fmt: skip
        pushed = work / "pushed.tar"
        _run(buildah("push", tag, f"oci-archive:{pushed}:{normalize(names[0])}"), log)
        rename_archive(pushed, names, CACHE / f"operator-{key}.tar")
        config = read_archive(CACHE / f"operator-{key}.tar")["config"]
    finally:
        subprocess.run(buildah("rmi", "--force", tag), capture_output=True)
        subprocess.run(buildah("rmi", "--prune"), capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    seconds = round(time.monotonic() - start, 1)
    layers = len(config["rootfs"]["diff_ids"])
    return _record("operator", key, names, {
        "build_seconds": seconds, "built_by": f"buildah {_tool_version('buildah')} bud (Dockerfile)",
        "base": base.archive.name, "layers": layers, "user": config["config"].get("User"),
    })  # fmt: skip


# ------------------------------------------------------------------------------------ entry points


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """One build at a time on this machine (a second caller waits, then finds the cache filled)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        _clean_dead_work()
        yield


def _clean_dead_work() -> None:
    """Remove what builds killed midway left in work/ (`<slug>-<pid>`), only for pids no longer alive.

    A live build's root filesystem has /proc, /sys and /dev/pts mounted inside it: never delete
    a work directory by hand while a build runs, and never through its mounts (_remove_tree).
    """
    work = CACHE / "work"
    if not work.is_dir():
        return
    for entry in work.iterdir():
        match = re.fullmatch(r"[a-z-]+-(\d+)(\.tar)?", entry.name)
        if not match or Path(f"/proc/{match.group(1)}").exists():
            continue
        if entry.is_dir() and not entry.is_symlink():
            _remove_tree(entry)
        else:
            entry.unlink(missing_ok=True)


def build_all(*, force: bool = False, only: Sequence[str] = ()) -> list[Built]:
    """Every image (or those whose slug is in `only`), built when missing; two chains run side
    by side (python-base -> operator with buildah, postgres -> pgbouncer with mmdebstrap; the
    mmdebstrap runs take turns)."""
    if os.geteuid() != 0:
        raise BuildError("building images needs root (mmdebstrap and buildah in root mode)")
    wanted = set(only) or {"operator", "postgres", "pgbouncer", "redis"}
    unknown = wanted - {"operator", "python-base", "postgres", "pgbouncer", "redis"}
    if unknown:
        raise BuildError(f"unknown image(s): {', '.join(sorted(unknown))}")

    base_done = threading.Event()  # the base first: the operator's chain is the longer one

    def operator_chain() -> list[Built]:
        try:
            base = build_debian(PYTHON_BASE, force=force and "python-base" in wanted)
        finally:
            base_done.set()
        out = [base] if "python-base" in wanted else []
        if "operator" in wanted:
            out.append(build_operator(base, force=force))
        return out

    def debian_chain() -> list[Built]:
        base_done.wait()
        return [build_debian(r, force=force) for r in (POSTGRES, PGBOUNCER, REDIS) if r.slug in wanted]

    chains: list[Callable[[], list[Built]]] = []
    if wanted & {"operator", "python-base"}:
        chains.append(operator_chain)
    else:
        base_done.set()
    if wanted & {"postgres", "pgbouncer", "redis"}:
        chains.append(debian_chain)
    with _locked(), ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(chain) for chain in chains]
        return [built for future in futures for built in future.result()]


def build_images() -> dict[str, Path]:
    """Every image pgscale's pods run, as {name: OCI archive}, built when missing.

    Keys are every name an archive carries (the operator's two names map to the same
    archive; import each archive once: `set(build_images().values())`). Names are as pod
    specs write them (`postgres:15`); containerd stores them normalized
    (`docker.io/library/postgres:15`, see normalize()).
    """
    return {name: built.archive for built in build_all() for name in built.names}


def import_images(archives: Sequence[Path], *, address: str, namespace: str = "k8s.io") -> list[str]:
    """Import archives into the containerd at `address`; return the names it then holds."""
    for archive in dict.fromkeys(archives):
        subprocess.run(["ctr", "--address", address, "--namespace", namespace, "images", "import", str(archive)],
                       check=True, capture_output=True, text=True)  # fmt: skip
    out = subprocess.run(["ctr", "--address", address, "--namespace", namespace, "images", "ls", "-q"],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return out.stdout.split()


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="build the images that are not cached; print names, archives, sizes, times")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.add_argument("--only", action="append", default=[], metavar="SLUG",
                   help="operator, python-base, postgres, pgbouncer or redis (repeatable)")  # fmt: skip
    b.add_argument("--json", action="store_true", help="print {name: archive} as JSON on stdout")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        built = build_all(force=args.force, only=args.only)
    except BuildError as e:
        print(f"images: {e}", file=sys.stderr)
        return 1
    for item in built:
        took = "cached" if item.cached else f"built in {item.info['build_seconds']} s"
        version = item.info.get("labels", {}).get("org.opencontainers.image.version", "")
        if item.slug == "python-base":
            version = f"python3 {item.info['packages']['python3']}"
        print(f"{item.slug:12} {_human(item.archive.stat().st_size):>9}  {took:18} {', '.join(item.names)}"
              f"{'  (' + version + ')' if version else ''}\n{'':12} {item.archive}", file=sys.stderr)  # fmt: skip
    print(f"images: ready in {time.monotonic() - start:.1f} s", file=sys.stderr)
    if args.json:
        print(json.dumps({name: str(b.archive) for b in built for name in b.names}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
