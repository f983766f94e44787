"""What FileMigration's controller and its Job share: the source columns, and the pure parts of
moving a file (object keys, streaming Base64 decoding, rate limits)."""

from __future__ import annotations

import base64
import binascii
import re
import threading
import time
from urllib.parse import quote

from .api.filemigration import FileMigrationSpec
from .pg import files as sqlf


def source(spec: FileMigrationSpec) -> sqlf.Source:
    """The migration's table and columns, as the ledger's SQL takes them."""
    cols = spec.columns
    return sqlf.Source(
        schema=spec.table.schema_,
        table=spec.table.name,
        key=spec.key_column,
        data=spec.data_column,
        path=spec.path_column,
        storage_type=spec.storage_type_column,
        size=cols.size if cols else None,
        file_name=cols.file_name if cols else None,
        content_type=cols.content_type if cols else None,
    )


_WHITESPACE = b" \t\n\r\x0b\x0c"  # what rb"\s" matches; bytes.translate drops it ~10x faster than re.sub
_DATA_URL = re.compile(rb"^data:([-\w.+]+/[-\w.+]+)?(;[-\w]+=[-\w.]+)*;base64,", re.IGNORECASE)


class Malformed(ValueError):
    """The stored data cannot be decoded; the row is skipped and recorded with this reason."""


def object_key(template: str, *, schema: str, table: str, key: object) -> str:
    """The object key of a row: the template with each token URL-quoted (no '/', '..' or spaces)."""
    safe = "-_.~"
    return (
        template.replace("{schema}", quote(schema, safe=safe))
        .replace("{table}", quote(table, safe=safe))
        .replace("{key}", quote(str(key), safe=safe))
    )


def versioned_key(base: str, sha256: str) -> str:
    """The key for content that differs from what `base` already holds: never overwrite, never lose."""
    return f"{base}~{sha256[:16]}"


PIECE = 256 * 1024  # bytes of Base64 decoded per C call


class Base64Stream:
    """Decodes Base64 text that arrives in slices of any length.

    Accepts line breaks and a leading data URL (``data:image/png;base64,``), whose
    media type is kept; rejects anything else that is not standard Base64.
    """

    def __init__(self) -> None:
        self._rest = b""
        self._first = True
        self._offset = 0
        self._padded = False
        self.media_type: str | None = None

    def feed(self, text: str | bytes) -> bytes:
        """Decode the next slice: text, or its UTF-8 bytes (the first non-ASCII byte starts the first
        non-ASCII character, so offsets read the same)."""
        if isinstance(text, bytes):
            raw = text
            if not raw.isascii():
                first = next(i for i, b in enumerate(raw) if b >= 0x80)
                raise Malformed(f"invalid Base64: non-ASCII character at offset {self._offset + first}")
        else:
            try:
                raw = text.encode("ascii")
            except UnicodeEncodeError as exc:
                raise Malformed(f"invalid Base64: non-ASCII character at offset {self._offset + exc.start}") from exc
        if self._first:
            self._first = False
            match = _DATA_URL.match(raw.lstrip())
            if match:
                self.media_type = match.group(1).decode() if match.group(1) else None
                self._offset += len(raw) - len(raw.lstrip()[match.end() :])
                raw = raw.lstrip()[match.end() :]
        # In pieces: each C call holds the GIL, and the other workers' uploads wait for it meanwhile.
        if len(raw) <= PIECE:
            return self._decode(raw)
        return b"".join(self._decode(raw[i : i + PIECE]) for i in range(0, len(raw), PIECE))

    def _decode(self, raw: bytes) -> bytes:
        data = self._rest + raw.translate(None, _WHITESPACE)
        if data and self._padded:
            raise Malformed(f"invalid Base64 near offset {self._offset}: data after the final padding")
        cut = len(data) - len(data) % 4
        self._rest = data[cut:]
        try:
            decoded = base64.b64decode(data[:cut], validate=True)  # rejects padding inside a slice
        except binascii.Error as exc:
            raise Malformed(f"invalid Base64 near offset {self._offset}: {exc}") from exc
        self._padded = data[:cut].endswith(b"=")
        self._offset += len(raw)
        return decoded

    def close(self) -> None:
        if self._rest:
            raise Malformed(f"invalid Base64: length is not a multiple of 4 ({len(self._rest)} characters left over)")


class RateLimiter:
    """Shared by all workers: at most `rows` rows and `bytes_` bytes per second (None: no limit)."""

    def __init__(self, rows: float | None = None, bytes_: float | None = None) -> None:
        self.rows, self.bytes = rows, bytes_
        self._lock = threading.Lock()
        self._next = time.monotonic()

    def acquire(self, size: int) -> None:
        if not self.rows and not self.bytes:
            return
        cost = max(1 / self.rows if self.rows else 0.0, size / self.bytes if self.bytes else 0.0)
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + cost
        if start > now:
            time.sleep(start - now)
