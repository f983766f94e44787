"""CloudNativePG's own operator on the test node, built here from the module pinned in hack/cnpg/go.mod.

No registry is reachable, so nothing of CloudNativePG is pulled:

- the manager binary is `go build ./cmd/manager` of the pinned module (static, CGO off), in the
  module's own directory (its go.mod and go.sum: its k8s.io modules are v0.35, not hack/k8s's
  v0.34, so the build shares only the Go toolchain's cache with the node's binaries);
- the operator image (operator_image()) is that binary alone, laid out as in CloudNativePG's
  image (its Dockerfile): operator/manager_<GOARCH> and /manager linking to it. The Deployment
  runs `/manager controller`; every instance Pod's init container `bootstrap-controller` runs
  `/manager bootstrap /controller/manager` from the same image to copy the instance manager
  into the Pod;
- the operand image is pgscale's `postgres:15` (hack/images.py: Debian's postgresql-15, binaries on
  PATH, uid/gid 999): CloudNativePG reads the major version from the tag, runs `initdb`, `pg_ctl`,
  `pg_controldata`, `pg_basebackup` and `pg_rewind` from PATH, and takes the uid and gid from the
  Cluster (`postgresUID`/`postgresGID: 999`; its default 26 has no passwd entry there, and initdb
  refuses a uid without a name);
- the manifests are the module's `config/default` rendered by the control plane's
  `kubectl kustomize` (CRDs, RBAC, webhook Service and configurations, the Deployment), with the
  Deployment's image set to operator_image(), never pulled, and its CPU limit (100m) dropped so
  a loaded 2-core machine does not throttle it (its memory limit stays).

The webhooks work as in any cluster: the operator makes its own CA and certificate and injects
it into the webhook configurations; the API server on the host reaches the webhook Service's
ClusterIP through the node's routes (hack/node.py).

The binary and the image archive are cached under <cache>/cnpg/<version>/ keyed on the module
version and the Go version; nothing lands in the checkout.

    uv run python hack/cnpg_operator.py build     # build (or find) the image; print its archive
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ociarchive
import yaml

ROOT = Path(__file__).resolve().parent.parent
MODULE = "github.com/cloudnative-pg/cloudnative-pg"
GO_MOD = ROOT / "hack" / "cnpg" / "go.mod"
CRDS_SCRIPT = ROOT / "hack" / "cnpg" / "crds.sh"
_XDG_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
CACHE = Path(os.environ.get("PGSCALE_CACHE", _XDG_CACHE / "pgscale")) / "cnpg"  # as hack/cnpg/crds.sh
NAMESPACE = "cnpg-system"
DEPLOYMENT = "cnpg-controller-manager"
# The operand: pgscale's image (hack/images.py POSTGRES_IMAGE) and the ids it runs Postgres as.
POSTGRES_IMAGE = "postgres:15"
POSTGRES_UID = 999


def version() -> str:
    """The pinned module version (v1.28.1)."""
    for line in GO_MOD.read_text().splitlines():
        parts = line.split()
        if parts[:2] == ["require", MODULE]:
            return parts[2]
    raise RuntimeError(f"no 'require {MODULE}' in {GO_MOD}")


def operator_image() -> str:
    """The name CloudNativePG's own release gives its image, at the pinned version."""
    return f"ghcr.io/cloudnative-pg/cloudnative-pg:{version().lstrip('v')}"


def module_dir() -> Path:
    """The pinned module's source (Go module cache; downloaded and verified by crds.sh)."""
    out = subprocess.run([str(CRDS_SCRIPT), "--source"], check=True, capture_output=True, text=True, timeout=900)
    return Path(out.stdout.strip())


def _goarch() -> str:
    return subprocess.run(["go", "env", "GOARCH"], check=True, capture_output=True, text=True).stdout.strip()


def _go_version() -> str:
    out = subprocess.run(["go", "env", "GOVERSION", "GOARCH"], check=True, capture_output=True, text=True)
    return " ".join(out.stdout.split())


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def manager_binary() -> Path:
    """CloudNativePG's manager, built from the pinned module when not cached (about 3-6 min cold)."""
    key = hashlib.sha256(f"{version()} {_go_version()} cgo=0 trimpath".encode()).hexdigest()[:16]
    out = CACHE / version() / f"manager-{key}"
    with _locked():
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.{os.getpid()}")
        env = {**os.environ, "CGO_ENABLED": "0", "GOWORK": "off", "GOFLAGS": "-mod=readonly", "GOTOOLCHAIN": "local"}
        t0 = time.monotonic()
        result = subprocess.run(
            ["go", "build", "-trimpath", "-o", str(tmp), "./cmd/manager"],
            cwd=module_dir(),
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        if result.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"go build {MODULE}/cmd/manager failed: {result.stderr[-3000:]}")
        tmp.rename(out)
        (out.parent / f"{out.name}.json").write_text(json.dumps({"build_seconds": round(time.monotonic() - t0, 1)}))
        return out


def operator_archive() -> Path:
    """The operator image as an OCI archive, cached by the binary's content."""
    binary = manager_binary()
    name = operator_image()
    layout = "operator/manager_<arch>, /manager link, 65532"  # change it when the image's layout changes
    digest = hashlib.sha256(binary.read_bytes() + f"{name} {layout} {ociarchive.FORMAT_VERSION}".encode())
    digest_hex = digest.hexdigest()[:16]
    out = CACHE / version() / f"operator-{digest_hex}.tar"
    with _locked():
        if out.exists():
            return out
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            rootfs = Path(tmp) / "rootfs"
            rootfs.mkdir()
            # CloudNativePG's layout: operator/manager_<GOARCH> (the operator lists the architectures
            # it can run instances on from that glob, relative to /) and /manager linking to it.
            arch = _goarch()
            (rootfs / "operator").mkdir()
            shutil.copy2(binary, rootfs / "operator" / f"manager_{arch}")
            (rootfs / "manager").symlink_to(f"operator/manager_{arch}")
            ociarchive.write_oci_archive(
                rootfs, Path(tmp) / "image.tar", name, entrypoint=["/manager"], user="65532:65532", workdir="/"
            )
            (Path(tmp) / "image.tar").rename(out)
        return out


def manifests(kubectl: Path) -> list[dict[str, Any]]:
    """The module's config/default rendered (kustomize), the Deployment set up for this node."""
    image = operator_image()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config"
        shutil.copytree(module_dir() / "config", config)
        for path in config.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        rendered = subprocess.run(
            [str(kubectl), "kustomize", str(config / "default")],
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        container = doc["spec"]["template"]["spec"]["containers"][0]
        container["image"] = image
        container["imagePullPolicy"] = "Never"
        container["resources"].get("limits", {}).pop("cpu", None)
        for env in container.get("env", []):
            if env["name"] == "OPERATOR_IMAGE_NAME":
                env["value"] = image
    return docs


def main(argv: list[str]) -> int:
    if argv[1:] != ["build"]:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    t0 = time.monotonic()
    archive = operator_archive()
    print(f"{operator_image()} {archive} ({time.monotonic() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
