"""Object storage for FileMigration and RetentionPolicy export: S3-compatible buckets and filesystem volumes.

Both stores offer the same few operations: a create-only write (never
overwrites: S3 ``If-None-Match: *``, the filesystem ``link()``), a look at an
object's size and recorded SHA-256, and a streaming read that re-hashes the
stored bytes. Every write streams from an iterator of chunks, so memory is
bounded by the chunk size, not by the file.

An S3 write carries the SHA-256 of its bytes (``x-amz-checksum-sha256``, per part for
multipart uploads): S3, MinIO and Ceph hash what they receive and refuse a body that
differs. ``put_new`` says whether the server confirmed the checksum; only when it did
not is a read-back (HEAD) needed to know the object is there as written.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .api.filemigration import Destination

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
    ) -> bool: ...

    def read_hash(self, key: str) -> ObjectInfo: ...

    def fetch(self, key: str) -> bytes: ...

    def stream(self, key: str) -> Iterator[bytes]: ...

    def delete(self, key: str) -> None: ...

    def location(self, key: str) -> str: ...


def s3_client(
    endpoint: str | None,
    region: str,
    access_key: str | None,
    secret_key: str | None,
    path_style: bool,
    max_pool: int = 16,
    *,
    attempts: int = 5,
    connect_timeout: float = 60,
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
        retries={"max_attempts": attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
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


def _b64_sha256(hex_digest: str) -> str | None:
    """The SHA-256 as S3 takes it (Base64 of the digest); None when `hex_digest` is not one."""
    try:
        raw = bytes.fromhex(hex_digest)
    except ValueError:
        return None
    return base64.b64encode(raw).decode() if len(raw) == 32 else None


class ChecksumMismatch(RuntimeError):
    """The bytes streamed for an object do not have the SHA-256 they were announced with."""


_NO_CHECKSUMS = {"NotImplemented", "InvalidArgument", "InvalidRequest", "XNotImplemented"}


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
        self.checksums = True  # cleared when the server refuses checksum headers (an old S3-compatible one)
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

    def put_new(self, key: str, chunks: Iterable[bytes], *, size: int, sha256: str, content_type: str | None) -> bool:
        """Write create-only; True when the server confirmed the bytes by their SHA-256 checksum."""
        from botocore.exceptions import ClientError

        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": self._key(key),
            "Metadata": {SHA256_META: sha256},
            **self.extra,
        }
        if content_type:
            args["ContentType"] = content_type
        checksum = _b64_sha256(sha256) if self.checksums else None
        try:
            if size < self.multipart_threshold:
                body = b"".join(chunks)
                if checksum is None:
                    self.client.put_object(Body=body, IfNoneMatch="*", **args)
                    return False
                try:
                    done = self.client.put_object(
                        Body=body, IfNoneMatch="*", ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum, **args
                    )
                except ClientError as exc:
                    if not self._refuses_checksums(exc):
                        raise
                    self.client.put_object(Body=body, IfNoneMatch="*", **args)
                    return False
                return bool(done.get("ChecksumSHA256") == checksum)
            return self._multipart(args, chunks, sha256)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                raise AlreadyExists(key) from exc
            raise

    def _refuses_checksums(self, exc: BaseException) -> bool:
        """A server that does not know checksum headers: write without them from now on (and read back)."""
        error = getattr(exc, "response", {}).get("Error", {})
        if error.get("Code") in _NO_CHECKSUMS and "checksum" in str(error.get("Message", "")).lower():
            self.checksums = False
            return True
        return False

    def _multipart(self, args: dict[str, Any], chunks: Iterable[bytes], sha256: str) -> bool:
        """Upload in parts, each with its SHA-256; the whole stream is hashed on the way and must match
        `sha256` before the upload is completed, so the parts the server confirmed are the announced file."""
        known = _b64_sha256(sha256) is not None
        use = self.checksums and known
        try:
            upload = self.client.create_multipart_upload(**args, **({"ChecksumAlgorithm": "SHA256"} if use else {}))
        except Exception as exc:
            if not (use and self._refuses_checksums(exc)):
                raise
            use = False
            upload = self.client.create_multipart_upload(**args)
        upload_id = upload["UploadId"]
        parts = []
        confirmed = use
        whole = hashlib.sha256()
        try:
            for number, part in enumerate(_rechunk(chunks, self.part_size), start=1):
                whole.update(part)
                checksum = {"ChecksumSHA256": _b64(hashlib.sha256(part).digest())} if use else {}
                done = self.client.upload_part(
                    Bucket=args["Bucket"],
                    Key=args["Key"],
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=part,
                    **({"ChecksumAlgorithm": "SHA256", **checksum} if use else {}),
                )
                parts.append({"PartNumber": number, "ETag": done["ETag"], **checksum})
                confirmed = confirmed and done.get("ChecksumSHA256") == checksum.get("ChecksumSHA256")
            if known and whole.hexdigest() != sha256:
                raise ChecksumMismatch(
                    f"the bytes sent for {args['Key']!r} have sha256 {whole.hexdigest()}, not {sha256}; upload aborted"
                )
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
        return confirmed

    def read_hash(self, key: str) -> ObjectInfo:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        digest, size = hashlib.sha256(), 0
        for chunk in body.iter_chunks(chunk_size=1024 * 1024):
            digest.update(chunk)
            size += len(chunk)
        return ObjectInfo(size, digest.hexdigest())

    def fetch(self, key: str) -> bytes:
        return bytes(self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read())

    def stream(self, key: str) -> Iterator[bytes]:
        body = self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"]
        yield from body.iter_chunks(chunk_size=1024 * 1024)

    def delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._key(key))


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
        return str(self._path(key)) if key else str(self.root)

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

    def put_new(self, key: str, chunks: Iterable[bytes], *, size: int, sha256: str, content_type: str | None) -> bool:
        """Write create-only (fsynced); False: the caller reads the size and hash back (a cheap stat)."""
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
        return False

    def read_hash(self, key: str) -> ObjectInfo:
        digest, size = hashlib.sha256(), 0
        with self._path(key).open("rb") as f:
            while chunk := f.read(1024 * 1024):
                digest.update(chunk)
                size += len(chunk)
        return ObjectInfo(size, digest.hexdigest())

    def fetch(self, key: str) -> bytes:
        return self._path(key).read_bytes()

    def stream(self, key: str) -> Iterator[bytes]:
        with self._path(key).open("rb") as f:
            while chunk := f.read(1024 * 1024):
                yield chunk

    def delete(self, key: str) -> None:
        path = self._path(key)
        for name in (path, path.with_name(path.name + ".sha256")):
            with contextlib.suppress(FileNotFoundError):
                name.unlink()


def _b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


def _rechunk(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Chunks of exactly `size` bytes (the last may be shorter), for multipart parts."""
    buf = bytearray()
    for chunk in chunks:
        if not buf and len(chunk) == size:  # already a part (e.g. read from a file by parts): no copies
            yield chunk
            continue
        buf += chunk
        while len(buf) >= size:
            yield bytes(buf[:size])
            del buf[:size]
    if buf:
        yield bytes(buf)


PROBE_KEY = ".pgscale-write-check"
PROBE = b"pgscale writes here\n"


def probe(store: ObjectStore) -> None:
    """Write a small object create-only (kept: later probes find it) and read it: raises what the store
    raises when it is unreachable, refuses the credentials or forbids writing."""
    with contextlib.suppress(AlreadyExists):
        store.put_new(PROBE_KEY, [PROBE], size=len(PROBE), sha256=hashlib.sha256(PROBE).hexdigest(), content_type=None)
    store.head(PROBE_KEY)


ENV_FS_ROOT = "PGSCALE_FS_ROOT"  # overrides FS_MOUNT (tests run a pod's command outside a pod)
FS_MOUNT = "/data"  # where a job pod mounts a filesystem destination's volume


def open_store(
    destination: Destination,
    env: dict[str, str] | None = None,
    *,
    concurrency: int = 8,
    part_size: int = 8 * 1024 * 1024,
    multipart_threshold: int = 8 * 1024 * 1024,
    attempts: int = 5,
    connect_timeout: float = 60,
) -> ObjectStore:
    """A destination (FileMigration's model), with credentials from the environment (the pod's
    Secret-backed AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY) and a volume under FS_MOUNT."""
    env = dict(os.environ if env is None else env)
    s3 = destination.s3
    if s3 is not None:
        client = s3_client(
            s3.endpoint,
            s3.region,
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
            s3.force_path_style,
            max_pool=concurrency * 2,
            attempts=attempts,
            connect_timeout=connect_timeout,
        )
        return S3Store(
            client,
            s3.bucket,
            s3.prefix,
            part_size=part_size,
            multipart_threshold=multipart_threshold,
            sse=s3.server_side_encryption,
            kms_key_id=s3.kms_key_id,
        )
    fs = destination.filesystem
    assert fs is not None
    return FilesystemStore(Path(env.get(ENV_FS_ROOT, FS_MOUNT)) / fs.path)


_CREDENTIALS = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken", "AuthFailure"}


def problem(exc: BaseException, destination: Destination, field: str) -> tuple[str, str, str] | None:
    """A storage failure as (spec field, reason, message) naming what to fix; None when it is not one
    of the known ones (unreachable endpoint, missing bucket, refused credentials, no permission).

    ``field`` is where the destination sits in the spec (e.g. ``export.destination``); messages
    name the bucket or directory, never a credential."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    s3 = destination.s3
    if s3 is None:
        if isinstance(exc, PermissionError):
            return (
                f"{field}.filesystem.claimName",
                "DestinationNotWritable",
                f"the job cannot write into the volume's directory ({exc.strerror}): give the pod's user "
                "write access (e.g. spec.job securityContext fsGroup) or use another claim",
            )
        if isinstance(exc, OSError):
            return (f"{field}.filesystem.path", "DestinationUnavailable", f"the volume's directory fails: {exc}")
        return None
    where = f"bucket {s3.bucket!r}" + (f" at {s3.endpoint}" if s3.endpoint else "")
    if isinstance(exc, EndpointConnectionError):
        return (
            f"{field}.s3.endpoint",
            "DestinationUnreachable",
            f"cannot reach the S3 endpoint of {where} ({exc}): fix the endpoint or the network",
        )
    if isinstance(exc, NoCredentialsError):
        return (
            f"{field}.s3.credentialsSecretRef",
            "CredentialsMissing",
            f"no S3 credentials for {where}: set credentialsSecretRef to a Secret with the access keys",
        )
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404", "NotFound"):
            return (f"{field}.s3.bucket", "BucketNotFound", f"{where} does not exist: create it or fix the name")
        if code in _CREDENTIALS:
            return (
                f"{field}.s3.credentialsSecretRef",
                "CredentialsRejected",
                f"{where} refused the access keys ({code}): fix the Secret's keys",
            )
        if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled"):
            return (
                f"{field}.s3.credentialsSecretRef",
                "DestinationNotWritable",
                f"the access keys may not write to {where} ({code}): grant s3:PutObject, s3:GetObject "
                "and s3:DeleteObject on the prefix",
            )
    return None
