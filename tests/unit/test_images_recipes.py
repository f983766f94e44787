"""hack/images.py without building anything: names, recipes, cache keys, archives, the Dockerfile.

The images themselves are run in tests/images (marker `images`). Here: the names are the ones
the operator's defaults and the chart use; the images fit the pod specs pgscale renders (users,
commands, paths); the Dockerfile keeps what the operator image promises (numeric non-root user,
no RUN in the runtime stage, context files the build copies); cache keys move with their inputs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any

import images
import ociarchive
import pytest
import yaml

from pgscale.api.cache import CacheSpec
from pgscale.api.databaseprofile import PoolingSpec, ReadReplicasSpec
from pgscale.controllers.base import OperatorConfig
from pgscale.kube import ObjectRef
from pgscale.specs import cache as cache_specs
from pgscale.specs import pooling, replicas

ROOT = Path(__file__).resolve().parents[2]


def dockerfile_stages(text: str) -> list[list[tuple[str, str]]]:
    """The Dockerfile as stages of (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    stages: list[list[tuple[str, str]]] = []
    for line in joined.splitlines():
        if not line.strip():
            continue
        instruction, _, args = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), " ".join(args.split())))
    return stages


STAGES = dockerfile_stages((ROOT / "Dockerfile").read_text())
BUILD, RUNTIME = STAGES[0], STAGES[-1]


def instructions(stage: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instr, args in stage if instr == name]


@pytest.fixture
def defaults(monkeypatch: pytest.MonkeyPatch) -> OperatorConfig:
    for var in ("PGSCALE_IMAGE", "PGSCALE_PGBOUNCER_IMAGE", "PGSCALE_POSTGRES_IMAGE"):
        monkeypatch.delenv(var, raising=False)
    return OperatorConfig()


def test_names_are_the_operator_defaults_and_the_charts(defaults: OperatorConfig) -> None:
    own, chart = images.operator_names()
    assert own == defaults.image == "pgscale:0.1.0"
    values = yaml.safe_load((ROOT / "charts/pgscale/values.yaml").read_text())
    app_version = yaml.safe_load((ROOT / "charts/pgscale/Chart.yaml").read_text())["appVersion"]
    assert chart == f"{values['image']['repository']}:{app_version}"
    assert images.POSTGRES_IMAGE == defaults.postgres_image == values["operator"]["postgresImage"]
    assert images.PGBOUNCER_IMAGE == defaults.pgbouncer_image == values["operator"]["pgbouncerImage"]
    assert images.POSTGRES.names[0] == images.POSTGRES_IMAGE
    assert images.PGBOUNCER.names[0] == images.PGBOUNCER_IMAGE


@pytest.mark.parametrize(
    ("name", "full"),
    [
        ("postgres:15", "docker.io/library/postgres:15"),
        ("pgscale:0.1.0", "docker.io/library/pgscale:0.1.0"),
        ("pgbouncer/pgbouncer:1.24.1", "docker.io/pgbouncer/pgbouncer:1.24.1"),
        ("ghcr.io/pgscale/pgscale:0.1.0", "ghcr.io/pgscale/pgscale:0.1.0"),
        ("localhost/pgbouncer:1.18.0", "localhost/pgbouncer:1.18.0"),
        ("registry:5000/a/b:1", "registry:5000/a/b:1"),
        ("docker.io/library/python:3.11-slim-bookworm", "docker.io/library/python:3.11-slim-bookworm"),
    ],
)
def test_normalize(name: str, full: str) -> None:
    assert images.normalize(name) == full


@pytest.mark.parametrize("name", ["postgres", "Postgres:15", "a b:1", "registry:5000/x"])
def test_normalize_refuses(name: str) -> None:
    with pytest.raises(ValueError):
        images.normalize(name)


def test_dockerfile_operator_image_contract() -> None:
    """Numeric non-root user (runAsNonRoot can verify it), the entrypoint the pod specs rely on,
    and a runtime stage without RUN: nothing of the build (nor its build-time mounts) reaches it."""
    assert len(STAGES) == 2
    assert instructions(RUNTIME, "USER") == ["65532:65532"]
    assert json.loads(instructions(RUNTIME, "ENTRYPOINT")[0]) == ["pgscale"]
    assert json.loads(instructions(RUNTIME, "CMD")[0]) == ["run", "--all-namespaces"]
    assert not instructions(RUNTIME, "RUN")
    assert instructions(RUNTIME, "COPY") == ["--from=build /opt/pgscale /opt/pgscale"]
    env = " ".join(instructions(RUNTIME, "ENV"))
    assert "PYTHONDONTWRITEBYTECODE=1" in env, "without it Python would write .pyc files into the image"
    for stage in STAGES:
        image = instructions(stage, "FROM")[0].split()[0]
        assert image == images.BASE_IMAGE, "the stand-in base hack/images.py builds has this name"


def test_dockerfile_copies_only_context_files() -> None:
    """The operator image is built from a copy of context_files(); every COPY source must be in it."""
    files = images.context_files()
    for args in instructions(BUILD, "COPY"):
        *sources, _dest = shlex.split(args)
        for source in sources:
            assert source in images.CONTEXT_FILES or source in images.CONTEXT_DIRS, source
            assert source in files or any(f.startswith(source + "/") for f in files), source
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert "**/__pycache__" in ignored


def test_build_stage_uv_commands() -> None:
    """The build installs uv with pip (the stand-in base must allow it) and syncs from uv.lock."""
    runs = instructions(BUILD, "RUN")
    assert runs[0].startswith("pip install") and "uv==" in runs[0]
    assert all(r.startswith("uv sync --frozen --no-dev") for r in runs[1:])
    assert "python3-pip" in images.PYTHON_BASE.packages
    assert "EXTERNALLY-MANAGED" in (images.PYTHON_BASE.finish or "")
    assert dict(images.PYTHON_BASE.env)["PATH"] == images.DEFAULT_PATH  # ENV PATH=...:$PATH extends it


def test_pgbouncer_image_fits_the_pooler_pods() -> None:
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "ns", "app", "uid")
    pod = pooling.deployment(owner, "app-pooler-rw", PoolingSpec(), images.PGBOUNCER_IMAGE, "s", "h", "rw")
    spec = pod["spec"]["template"]["spec"]
    container = spec["containers"][0]
    assert images.PGBOUNCER.cmd == tuple(container["command"])
    assert images.PGBOUNCER.user == f"{spec['securityContext']['runAsUser']}:{spec['securityContext']['runAsGroup']}"
    assert "pgbouncer" in images.PGBOUNCER.packages


def test_postgres_image_fits_the_replica_pods() -> None:
    owner = ObjectRef("pgscale.io/v1alpha1", "DatabaseProfile", "ns", "app", "uid")
    spec = ReadReplicasSpec.model_validate(
        {"instances": 1, "replicationSecretRef": {"name": "repl"}, "storage": {"size": "1Gi"}}
    )
    sts = replicas.statefulset(owner, spec, image=images.POSTGRES_IMAGE, primary_host="10.0.0.1", primary_port=5432)
    pod = sts["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 999
    assert "postgres:x:999:999:" in (images.POSTGRES.essential_hook or "")
    path = dict(images.POSTGRES.env)["PATH"].split(":")
    assert path[0] == "/usr/lib/postgresql/15/bin", "the real binaries, before Debian's pg_wrapper in /usr/bin"
    script = replicas.bootstrap_script()
    for tool in ("pg_basebackup", "postgres"):
        assert re.search(rf"\b{tool}\b", script)
    assert pod["containers"][0]["readinessProbe"]["exec"]["command"][0] == "pg_isready"
    assert {"name": "run", "mountPath": "/var/run/postgresql"} in pod["containers"][0]["volumeMounts"]


def test_redis_image_fits_the_cache_pods(tmp_path: Path) -> None:
    """The cache pod passes only its config file: the entrypoint starts redis-server with it, as the
    official valkey/redis images' entrypoints do; the image's user is the pod's."""
    owner = ObjectRef("pgscale.io/v1alpha1", "Cache", "ns", "tasks", "uid")
    spec = CacheSpec.model_validate({"profileRef": {"name": "app"}, "image": images.REDIS_IMAGE})
    pod = cache_specs.deployment(owner, spec, memory_bytes=256 * 2**20, config_hash="h")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["image"] == images.REDIS_IMAGE and "command" not in container
    assert images.REDIS.user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    assert images.REDIS.entrypoint == ("docker-entrypoint.sh",) and "redis-server" in images.REDIS.packages
    script = tmp_path / "docker-entrypoint.sh"
    script.write_text(images.REDIS_ENTRYPOINT.replace('exec "$@"', 'echo "$@"'))
    cases = [
        (container["args"], f"redis-server {container['args'][0]}"),
        (["--port", "1"], "redis-server --port 1"),
        (["redis-cli", "ping"], "redis-cli ping"),
    ]
    for args, want in cases:
        out = subprocess.run(["sh", str(script), *args], check=True, capture_output=True, text=True).stdout
        assert out.strip() == want


def write_fake_root(root: Path) -> None:
    (root / "etc/apt/sources.list.d").mkdir(parents=True)
    (root / "etc/os-release").write_text('PRETTY_NAME="Debian GNU/Linux 12 (bookworm)"\nVERSION_CODENAME=bookworm\n')
    (root / "etc/apt/sources.list").write_text(
        "# comment\ndeb [arch=amd64] http://mirror.example/debian/ bookworm main contrib\n"
        "deb-src http://mirror.example/debian bookworm main\n"
        "deb http://mirror.example/debian bookworm-backports main\n"
    )
    (root / "etc/apt/sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n"
        "Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\nComponents: main\n"
    )
    (root / "etc/apt/sources.list.d/nodesource.sources").write_text(
        "Types: deb\nURIs: https://deb.nodesource.com/node_20.x\nSuites: nodistro\nComponents: main\n"
    )
    (root / "etc/apt/sources.list.d/docker.list").write_text(
        "deb https://download.docker.com/linux/debian bookworm stable\n"
    )
    (root / "etc/apt/sources.list.d/off.sources").write_text(
        "Enabled: no\nTypes: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n"
    )
    (root / "etc/apt/sources.list.d/google.list.disabled").write_text("deb https://x.example/apt bookworm main\n")


def test_apt_sources_keeps_the_debian_suites_only(tmp_path: Path) -> None:
    write_fake_root(tmp_path)
    suite, lines = images.apt_sources(tmp_path)
    assert suite == "bookworm"
    assert lines == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://mirror.example/debian bookworm main",
        "deb http://mirror.example/debian bookworm-updates main",
        "deb http://security.example/debian-security bookworm-security main",
    ]


def test_keys_move_with_their_inputs(tmp_path: Path) -> None:
    sources = ["deb http://mirror.example/debian bookworm main"]
    key = images.recipe_key(images.POSTGRES, sources, "1.3.5")
    assert key == images.recipe_key(images.POSTGRES, sources, "1.3.5")
    assert key != images.recipe_key(images.POSTGRES, [*sources, "deb http://x bookworm-updates main"], "1.3.5")
    assert key != images.recipe_key(images.POSTGRES, sources, "1.3.6")
    more = dataclasses.replace(images.POSTGRES, packages=(*images.POSTGRES.packages, "postgresql-15-repack"))
    assert key != images.recipe_key(more, sources, "1.3.5")

    root = tmp_path / "repo"
    for name in images.CONTEXT_FILES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(name)
    (root / "operator/pgscale").mkdir(parents=True)
    (root / "operator/pgscale/cli.py").write_text("x = 1\n")
    before = images.operator_key("base", root, "1.28")
    (root / "operator/pgscale/__pycache__").mkdir()
    (root / "operator/pgscale/__pycache__/cli.cpython-311.pyc").write_bytes(b"\0")
    assert images.operator_key("base", root, "1.28") == before, "caches are not inputs"
    assert images.operator_key("other-base", root, "1.28") != before
    (root / "operator/pgscale/cli.py").write_text("x = 2\n")
    assert images.operator_key("base", root, "1.28") != before
    (root / "uv.lock").write_text("changed")
    assert images.operator_key("base", root, "1.28") != before


def members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def test_rename_archive_names_and_config(tmp_path: Path) -> None:
    """One index entry per normalized name; extra config fields give a new, consistent config and manifest."""
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin/true").write_text("")
    first = tmp_path / "a.tar"
    digest = ociarchive.write_oci_archive(root, first, "docker.io/library/x:1", cmd=["true"], user="1:1")
    out = tmp_path / "b.tar"
    assert images.rename_archive(first, ["x:1", "ghcr.io/o/x:1"], out) == digest
    index = json.loads(members(out)["index.json"])
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [
        "docker.io/library/x:1",
        "ghcr.io/o/x:1",
    ]
    assert {m["digest"] for m in index["manifests"]} == {digest}

    changed = images.rename_archive(
        first, ["x:1"], out, config={"ExposedPorts": {"5432/tcp": {}}, "StopSignal": "SIGINT"}
    )
    assert changed != digest
    files = members(out)
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1], name
    info: dict[str, Any] = images.read_archive(out)
    assert info["index"]["manifests"][0]["digest"] == changed
    assert info["config"]["config"]["StopSignal"] == "SIGINT"
    assert info["config"]["config"]["ExposedPorts"] == {"5432/tcp": {}}
    assert info["config"]["config"]["Cmd"] == ["true"] and info["config"]["config"]["User"] == "1:1"
    layer = info["manifest"]["layers"][0]["digest"]
    assert f"blobs/sha256/{layer.split(':')[1]}" in files
    assert sum(1 for n in files if n.startswith("blobs/")) == 3, "the old config and manifest are not carried"


def test_prune_keeps_recent_and_one_more(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Old archives of an image go after a day unused; the current one and the newest other stay."""
    monkeypatch.setattr(images, "CACHE", tmp_path)
    now = time.time()
    ages = {"a" * 16: 0, "b" * 16: 3 * 86400, "c" * 16: 2 * 86400, "d" * 16: 3600, "e" * 16: 5 * 86400}
    for key, age in ages.items():
        for suffix in (".tar", ".json"):
            path = tmp_path / f"postgres-{key}{suffix}"
            path.write_text("")
            os.utime(path, (now - age, now - age))
    (tmp_path / "pgbouncer-ffffffffffffffff.tar").write_text("")
    images._prune("postgres", tmp_path / f"postgres-{'e' * 16}.tar")
    left = sorted(p.name for p in tmp_path.glob("*.tar"))
    kept = [f"postgres-{key * 16}.tar" for key in "ade"]  # current (e), newest other (a), used an hour ago (d)
    assert left == sorted([*kept, "pgbouncer-ffffffffffffffff.tar"])
    assert not (tmp_path / f"postgres-{'b' * 16}.json").exists()
