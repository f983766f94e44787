"""Write a one-layer OCI image archive with the standard library alone.

No registry is reachable on the test machines, so images are built here and loaded into the
node's containerd with `ctr -n k8s.io images import` (hack/node.py, Node.import_image). The
archive is an OCI image layout in a tar file (`oci-layout`, `index.json`, `blobs/sha256/...`)
holding one uncompressed layer, the image config and the manifest; the index carries the image
name in the `io.containerd.image.name` annotation, which is what `ctr images import` names the
image after. Nothing else (umoci, buildah, skopeo) is needed.

    write_oci_archive(rootfs, out, "pgscale.local/pause:1", entrypoint=["/pause"])

`rootfs` is a directory (archived with numeric owners, modes, mtimes and hard links; extended
attributes such as file capabilities are not carried) or a tar file of the root filesystem,
plain or gzip-compressed (mmdebstrap writes one when its target ends in `.tar`), used as the
layer as it is. The archive is written next to `out` and renamed into place, so a cached
archive is either complete or absent.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

# Bumped whenever the bytes written for the same inputs change: caches of archives key on it.
FORMAT_VERSION = 1
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CONFIG_TYPE = "application/vnd.oci.image.config.v1+json"
LAYER_TYPE = "application/vnd.oci.image.layer.v1.tar"
_CHUNK = 1 << 20


def write_oci_archive(
    rootfs: Path | str,
    out: Path | str,
    name: str,
    *,
    entrypoint: Sequence[str] | None = None,
    cmd: Sequence[str] | None = None,
    env: Mapping[str, str] | Sequence[str] | None = None,
    user: str | None = None,
    workdir: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> str:
    """Write `rootfs` as a one-layer OCI image named `name` (a full reference with a tag, e.g.
    `pgscale.local/pause:1`) to the tar file `out`; return the manifest's digest.

    `env` is a mapping or `KEY=value` strings; a default PATH is added when it has none (the
    runtime looks the entrypoint up on it). `user` is `uid[:gid]` or a name the image's
    /etc/passwd knows; `workdir` an absolute path; `labels` the image's labels.
    """
    rootfs, out = Path(rootfs), Path(out)
    if ":" not in name.rsplit("/", 1)[-1]:
        raise ValueError(f"image name {name!r} needs a tag (imported images are never pulled; avoid :latest)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        layer = _layer_file(rootfs, Path(tmp))
        layer_digest, layer_size = _digest(layer)
        env_list = [f"{k}={v}" for k, v in env.items()] if isinstance(env, Mapping) else list(env or [])
        if not any(e.startswith("PATH=") for e in env_list):
            env_list.insert(0, DEFAULT_PATH)
        config: dict[str, Any] = {"Env": env_list}
        for key, value in (("Entrypoint", entrypoint), ("Cmd", cmd)):
            if value is not None:
                config[key] = list(value)
        for key, text in (("User", user), ("WorkingDir", workdir)):
            if text:
                config[key] = text
        if labels:
            config["Labels"] = dict(labels)
        image_config = _json({
            "architecture": _goarch(), "os": "linux", "config": config,
            "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
            "history": [{"created_by": "hack/ociarchive.py"}],
        })  # fmt: skip
        config_digest = _sha(image_config)
        manifest = _json({
            "schemaVersion": 2, "mediaType": MANIFEST_TYPE,
            "config": {"mediaType": CONFIG_TYPE, "digest": config_digest, "size": len(image_config)},
            "layers": [{"mediaType": LAYER_TYPE, "digest": layer_digest, "size": layer_size}],
        })  # fmt: skip
        manifest_digest = _sha(manifest)
        index = _json({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
            "manifests": [{
                "mediaType": MANIFEST_TYPE, "digest": manifest_digest, "size": len(manifest),
                "annotations": {"io.containerd.image.name": name,
                                "org.opencontainers.image.ref.name": name.rsplit(":", 1)[1]},
            }],
        })  # fmt: skip
        partial = Path(tmp) / "archive.tar"
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_bytes(tar, "oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
            _add_bytes(tar, "index.json", index)
            _add_bytes(tar, _blob(manifest_digest), manifest)
            _add_bytes(tar, _blob(config_digest), image_config)
            info = tarfile.TarInfo(_blob(layer_digest))
            info.size, info.mode = layer_size, 0o644
            with layer.open("rb") as fh:
                tar.addfile(info, fh)
        os.replace(partial, out)
    return manifest_digest


def _layer_file(rootfs: Path, tmp: Path) -> Path:
    """The uncompressed layer tar: `rootfs` itself when it is a plain tar, otherwise written to `tmp`."""
    if rootfs.is_dir():
        layer = tmp / "layer.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
            _add_tree(tar, rootfs)
        return layer
    with rootfs.open("rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    if not gzipped:
        return rootfs
    layer = tmp / "layer.tar"
    with gzip.open(rootfs, "rb") as src, layer.open("wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
    return layer


def _add_tree(tar: tarfile.TarFile, root: Path) -> None:
    """Every entry under `root` in sorted order, owners numeric, sockets skipped (a layer cannot hold them)."""
    for dirpath, dirnames, filenames in os.walk(root):  # symlinks to directories are entries, not descended
        dirnames.sort()
        here = Path(dirpath)
        for entry in [*dirnames, *sorted(filenames)]:
            path = here / entry
            arcname = path.relative_to(root).as_posix()
            info = tar.gettarinfo(str(path), arcname)
            if info is None:  # a socket
                continue
            info.uname = info.gname = ""
            if info.isreg():
                with path.open("rb") as fh:
                    tar.addfile(info, fh)
            else:
                tar.addfile(info)


def _add_bytes(tar: tarfile.TarFile, arcname: str, data: bytes) -> None:
    info = tarfile.TarInfo(arcname)
    info.size, info.mode = len(data), 0o644
    tar.addfile(info, io.BytesIO(data))


def _digest(path: Path) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return f"sha256:{h.hexdigest()}", size


def _sha(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.split(":", 1)[1]


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _goarch() -> str:
    machine = os.uname().machine
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def read_config(archive: Path | str) -> dict[str, Any]:
    """The image config of an archive written by write_oci_archive (for tests and cache checks)."""
    with tarfile.open(archive) as tar:
        index = json.loads(_read(tar, "index.json"))
        manifest = json.loads(_read(tar, _blob(index["manifests"][0]["digest"])))
        return dict(json.loads(_read(tar, _blob(manifest["config"]["digest"]))))


def read_ref(archive: Path | str) -> tuple[str, str] | None:
    """(image name, manifest digest) of an OCI archive with one named image, else None (e.g. a docker
    archive): lets an importer skip an image it already holds."""
    with contextlib.suppress(KeyError, ValueError, IndexError, tarfile.TarError), tarfile.open(archive) as tar:
        entry = json.loads(_read(tar, "index.json"))["manifests"][0]
        return str(entry["annotations"]["io.containerd.image.name"]), str(entry["digest"])
    return None


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    member: IO[bytes] | None = tar.extractfile(name)
    if member is None:
        raise KeyError(name)
    with contextlib.closing(member):
        return member.read()
