"""Object storage for FileMigration: S3-compatible buckets and filesystem volumes.

Both stores offer the same few operations: a create-only write (never
overwrites: S3 ``If-None-Match: *``, the filesystem ``link()``), a look at an
object's size and recorded SHA-256, and a streaming read that re-hashes the
stored bytes. Every write streams from an iterator of chunks, so memory is
bounded by the chunk size, not by the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

SHA256_META = "sha256"  # x-amz-meta-sha256: the hex digest of the decoded file


class AlreadyExists(Exception):
    """The key holds an object already; create-only writes never replace it."""


@dataclass(frozen=True)
class ObjectInfo:
    """What a store says about one object."""

    size: int
    sha256: str | None


class ObjectStore(Protocol):
    """What FileMigration needs from a destination."""

    def head(self, key: str) -> ObjectInfo | None: ...

    def put_new(
        self, key: str, chunks: Iterable[bytes], *, size: int, sha256: str, content_type: str | None
    ) -> None: ...

    def read_hash(self, key: str) -> ObjectInfo: ...

    def location(self, key: str) -> str: ...


def s3_client(
    endpoint: str | None,
    region: str,
    access_key: str | None,
    secret_key: str | None,
    path_style: bool,
    max_pool: int = 16,
) -> Any:
    """A boto3 S3 client that works with S3-compatible stores.

    boto3 1.36+ adds CRC checksums to every request by default, which MinIO and
    others reject; 'when_required' restores the classic behaviour.
    """
    import boto3
    from botocore.config import Config

    config = Config(
        region_name=region,
        signature_version="s3v4",
        s3={"addressing_style": "path" if path_style else "auto"},
        retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=max_pool,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


class S3Store:
    """A bucket (and prefix) on S3, MinIO or another S3-compatible server."""

    def __init__(
        self,
        client: Any,
        bucket: str,
        prefix: str = "",
        *,
        part_size: int = 8 * 1024 * 1024,
        multipart_threshold: int = 8 * 1024 * 1024,
        sse: str | None = None,
        kms_key_id: str | None = None,
    ) -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix
        self.part_size = max(part_size, 5 * 1024 * 1024)  # S3's minimum part size
        self.multipart_threshold = multipart_threshold
        self.extra: dict[str, str] = {}
        if sse:
            self.extra["ServerSideEncryption"] = sse
        if kms_key_id:
            self.extra["SSEKMSKeyId"] = kms_key_id

    def _key(self, key: str) -> str:
        return self.prefix + key

    def location(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def head(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            found = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return ObjectInfo(int(found["ContentLength"]), (found.get("Metadata") or {}).get(SHA256_META))

    def put_new(self, key: str, chunks: Iterable[bytes], *, size: int, sha256: str, content_type: str | None) -> None:
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Metadata": {SHA256_META: sha256},
            **self.extra,
        }
        if content_type:
            args["ContentType"] = content_type
        try:
            if size < self.multipart_threshold:
                body = b"".join(chunks)
                self.client.put_object(Body=body, IfNoneMatch="*", **args)
            else:
                self._multipart(args, chunks)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise AlreadyExists(key) from exc
            raise

    def _multipart(self, args: dict[str, Any], chunks: Iterable[bytes]) -> None:
        upload = self.client.create_multipart_upload(**args)
        upload_id = upload["UploadId"]
        parts = []
        try:
            for number, part in enumerate(_rechunk(chunks, self.part_size), start=1):
                done = self.client.upload_part(
                    Bucket=args["Bucket"], Key=args["Key"], UploadId=upload_id, PartNumber=number, Body=part
                )
                parts.append({"PartNumber": number, "ETag": done["ETag"]})
            self.client.complete_multipart_upload(
                Bucket=args["Bucket"],
                Key=args["Key"],
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
                IfNoneMatch="*",
            )
        except BaseException:
            with contextlib.suppress(Exception):
                self.client.abort_multipart_upload(Bucket=args["Bucket"], Key=args["Key"], UploadId=upload_id)
            raise

    def read_hash(self, key: str) -> ObjectInfo:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        digest, size = hashlib.sha256(), 0
        for chunk in body.iter_chunks(chunk_size=1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return ObjectInfo(size, digest.hexdigest())


class FilesystemStore:
    """A directory on a volume. Create-only through link(): an existing name is never replaced."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents:
            raise ValueError(f"object key {key!r} leaves the destination directory")
        return path

    def location(self, key: str) -> str:
        return str(self._path(key))

    def head(self, key: str) -> ObjectInfo | None:
        path = self._path(key)
        if not path.exists():
            return None
        sha = None
        with contextlib.suppress(OSError):
            sha = os.getxattr(path, f"user.{SHA256_META}").decode()
        if sha is None and (side := path.with_name(path.name + ".sha256")).exists():
            sha = side.read_text().strip()
        return ObjectInfo(path.stat().st_size, sha)

    def put_new(self, key: str, chunks: Iterable[bytes], *, size: int, sha256: str, content_type: str | None) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".pgscale-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            try:
                os.setxattr(tmp, f"user.{SHA256_META}", sha256.encode())
            except OSError:  # no user xattrs on this filesystem: a sidecar file instead
                Path(tmp + ".sha256").write_text(sha256)
            try:
                os.link(tmp, path)  # atomic and create-only
            except FileExistsError as exc:
                raise AlreadyExists(key) from exc
            if Path(tmp + ".sha256").exists():
                os.replace(tmp + ".sha256", str(path) + ".sha256")
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp + ".sha256")

    def read_hash(self, key: str) -> ObjectInfo:
        digest, size = hashlib.sha256(), 0
        with self._path(key).open("rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        return ObjectInfo(size, digest.hexdigest())


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Chunks of exactly `size` bytes (the last may be shorter), for multipart parts."""
    buf = bytearray()
    for chunk in chunks:
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)
