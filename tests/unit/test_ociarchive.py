"""hack/ociarchive.py: the archive is a valid OCI image layout that `ctr images import` can name."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import tarfile
from pathlib import Path

import ociarchive
import pytest


def _members(archive: Path) -> dict[str, bytes]:
    with tarfile.open(archive) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]


def _rootfs(tmp_path: Path) -> Path:
    root = tmp_path / "rootfs"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "hello").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "hello").chmod(0o755)
    os.link(root / "bin" / "hello", root / "bin" / "hello2")
    (root / "sbin").symlink_to("bin")
    return root


def test_layout_digests_and_name(tmp_path: Path) -> None:
    out = tmp_path / "img.tar"
    digest = ociarchive.write_oci_archive(
        _rootfs(tmp_path), out, "pgscale.local/hello:1",
        entrypoint=["/bin/hello"], env={"A": "1"}, user="65532:65532", workdir="/", labels={"x": "y"},
    )  # fmt: skip
    files = _members(out)
    assert json.loads(files["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name, data in files.items():
        if name.startswith("blobs/sha256/"):
            assert hashlib.sha256(data).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(files["index.json"])
    entry = index["manifests"][0]
    assert entry["digest"] == digest
    assert entry["annotations"]["io.containerd.image.name"] == "pgscale.local/hello:1"
    assert entry["annotations"]["org.opencontainers.image.ref.name"] == "1"
    config = ociarchive.read_config(out)
    assert config["config"]["Entrypoint"] == ["/bin/hello"]
    assert config["config"]["Env"] == [ociarchive.DEFAULT_PATH, "A=1"]
    assert config["config"]["User"] == "65532:65532"
    assert config["config"]["Labels"] == {"x": "y"}
    manifest = json.loads(files["blobs/sha256/" + digest.split(":")[1]])
    layer = files["blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1]]
    assert config["rootfs"]["diff_ids"] == [manifest["layers"][0]["digest"]]  # uncompressed: diff_id = digest
    (tmp_path / "layer.tar").write_bytes(layer)
    with tarfile.open(tmp_path / "layer.tar") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["bin/hello"].isreg() and members["bin/hello"].mode == 0o755
    assert members["bin/hello2"].islnk() and members["bin/hello2"].linkname == "bin/hello"
    assert members["sbin"].issym() and members["sbin"].linkname == "bin"
    assert members["bin/hello"].uname == ""


def test_tar_input_plain_and_gzip_same_image(tmp_path: Path) -> None:
    root = _rootfs(tmp_path)
    plain = tmp_path / "rootfs.tar"
    with tarfile.open(plain, "w") as tar:
        tar.add(root, arcname=".")
    (tmp_path / "rootfs.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    a = ociarchive.write_oci_archive(plain, tmp_path / "a.tar", "pgscale.local/t:1", cmd=["sh"])
    b = ociarchive.write_oci_archive(tmp_path / "rootfs.tar.gz", tmp_path / "b.tar", "pgscale.local/t:1", cmd=["sh"])
    assert a == b
    assert ociarchive.read_config(tmp_path / "a.tar")["config"]["Cmd"] == ["sh"]


def test_name_needs_a_tag(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a tag"):
        ociarchive.write_oci_archive(_rootfs(tmp_path), tmp_path / "x.tar", "pgscale.local:5000/x")


def test_read_ref(tmp_path: Path) -> None:
    digest = ociarchive.write_oci_archive(_rootfs(tmp_path), tmp_path / "r.tar", "pgscale.local/r:2")
    assert ociarchive.read_ref(tmp_path / "r.tar") == ("pgscale.local/r:2", digest)
    (tmp_path / "not.tar").write_bytes(b"")
    assert ociarchive.read_ref(tmp_path / "not.tar") is None
