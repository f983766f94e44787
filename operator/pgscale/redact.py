"""The one redaction layer: secrets never leave the process in a message.

Every text that leaves pgscale (condition messages and other status fields,
Events, log lines in every format, `pgscale status` and Job output) passes
through :func:`redact`. It removes, by shape, passwords in URIs
(``scheme://user:***@host``) and in key=value DSNs, JSON or YAML
(``password=***``, quoted or not, closed or not), S3 secret keys and tokens;
and, by value, everything pgscale read from a Secret (:func:`remember`), so a
password with spaces or quotes that no pattern recognises is still removed.
Redaction is idempotent, so a text may pass through it more than once.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import traceback
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, TextIO
from urllib.parse import quote

MASK = "***"
# Values shorter than this are not remembered: "s" or "app" would blank out ordinary words.
MIN_REMEMBERED = 6
MAX_REMEMBERED = 4096
# Secret keys whose values are names, not secrets (a Secret's host or user is shown on purpose).
PUBLIC_KEYS = frozenset(
    {
        "host",
        "hostname",
        "port",
        "dbname",
        "database",
        "user",
        "username",
        "sslmode",
        "jdbc-uri-host",
        "aws_access_key_id",
        "access_key_id",
        "accesskeyid",
        "region",
        "aws_region",
        "aws_default_region",
        "endpoint",
        "endpoint_url",
        "bucket",
        "ca.crt",
    }
)

# Key names, not a password.
_SECRET_WORDS = "|".join(
    [
        "password",
        "passwd",
        "pwd",
        "sslpassword",
        "pgpassword",
        "pgscale_db_password",
        "replication_password",
        "aws_secret_access_key",
        "secret_access_key",
        "secretaccesskey",
        "secret[_-]?key",
        "aws_session_token",
        "session_token",
        "token",
        "api[_-]?key",
        "client[_-]?secret",
    ]
)
# `password=...`, `"password": "..."`, `PGPASSWORD='...`: the value quoted (closed or not) or up to a space.
_KEY_VALUE = re.compile(
    rf"""(?ix)
    (?P<key>(?<![a-z0-9])(?:{_SECRET_WORDS})["']?[ \t]*(?:=|:(?!//))[ \t]*)
    (?P<value>'(?:[^'\\\n]|\\.)*'?|"(?:[^"\\\n]|\\.)*"?|[^\s,;}}\]]+)
    """
)
# scheme://user:password@host: the password runs to the last @ before a space (it may contain @ and quotes).
_URI_USERINFO = re.compile(r"(?i)(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/?#@'\"\[\]]*:)(?P<value>\S*)@")
# scheme://user:password with no @ (a host left out): whatever follows the colon, unless it is a port.
_URI_NO_HOST = re.compile(
    r"(?i)(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/?#@'\"\[\]]*:)"
    r"(?!\d+(?:[/?\s'\",;)]|$))(?P<value>[^\s@'\",;)]+)(?=[\s'\",;)]|$)"
)

_lock = threading.Lock()
_known: OrderedDict[str, None] = OrderedDict()
_known_pattern: re.Pattern[str] | None = None


def remember(*values: str | None) -> None:
    """Values read from a Secret (and their percent-encoded forms) are removed from every text from now on."""
    global _known_pattern
    with _lock:
        added = False
        for value in values:
            if not value or len(value) < MIN_REMEMBERED:
                continue
            for form in {value, quote(value, safe=""), value.strip()}:
                if len(form) >= MIN_REMEMBERED and form not in _known:
                    _known[form] = None
                    added = True
                elif form in _known:
                    _known.move_to_end(form)
        while len(_known) > MAX_REMEMBERED:  # a rotating Secret must not grow this forever
            _known.popitem(last=False)
            added = True
        if added:
            ordered = sorted(_known, key=len, reverse=True)  # the longest first: a value may contain another
            # Whole values only: a password "secret" must not turn "secretRef" into "***Ref" (a value glued
            # to letters or digits on either side is another word, never the password).
            alternatives = "|".join(re.escape(v) for v in ordered)
            _known_pattern = re.compile(f"(?<![A-Za-z0-9])(?:{alternatives})(?![A-Za-z0-9])") if ordered else None


def remember_secret(data: dict[str, str]) -> None:
    """Every value of a Secret's data except those under keys that hold names (host, user, ...)."""
    values: list[str] = []
    for key, value in data.items():
        if key.lower() in PUBLIC_KEYS:
            continue
        values.append(value)
        values.extend(uri_passwords(value))
    remember(*values)


def uri_passwords(text: str) -> list[str]:
    """The password-looking parts of a connection string, even one no parser accepts."""
    found = [m.group("value") for m in _URI_USERINFO.finditer(text)]
    found += [m.group("value") for m in _URI_NO_HOST.finditer(text)]
    found += [_unquote(m.group("value")) for m in _KEY_VALUE.finditer(text)]
    # A password with a space: from after "user:" to the last "@" of the whole string.
    head = re.match(r"(?i)\s*[a-z][a-z0-9+.-]*://[^\s:/?#@]*:", text)
    if head and "@" in text[head.end() :]:
        found.append(text[head.end() : text.rindex("@")])
    return [f for f in found if f]


def _unquote(value: str) -> str:
    if value[:1] in "'\"":
        value = value[1:]
        if value[-1:] in "'\"":
            value = value[:-1]
    return value


def redact(text: str) -> str:
    """The text with every secret replaced by ***."""
    if not text:
        return text
    pattern = _known_pattern
    if pattern is not None:
        text = pattern.sub(MASK, text)
    text = _URI_USERINFO.sub(lambda m: f"{m.group('head')}{MASK}@", text)
    text = _URI_NO_HOST.sub(lambda m: f"{m.group('head')}{MASK}", text)
    return _KEY_VALUE.sub(_mask_value, text)


def _mask_value(m: re.Match[str]) -> str:
    value = m.group("value")
    if value == MASK or value.strip("'\"") == MASK:
        return m.group(0)
    quote_char = value[0] if value[:1] in "'\"" else ""
    return f"{m.group('key')}{quote_char}{MASK}{quote_char}"


def redact_any(value: Any) -> Any:
    """Every string in a JSON-like value (a status patch, an object) redacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_any(v) for k, v in value.items()}
    if isinstance(value, list):
        return [redact_any(v) for v in value]
    return value


class RedactingFilter(logging.Filter):
    """On a handler: the record's message and traceback are redacted before any formatter sees them."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, redacted
            message = f"{record.msg!r} {record.args!r}"
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def install_logging_filter(handlers: Iterable[logging.Handler] | None = None) -> None:
    """Put the filter on every handler of the root logger (a logger's own filter misses propagated records)."""
    for handler in handlers if handlers is not None else logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


class RedactingStream(io.TextIOBase):
    """A text stream that redacts whole lines before passing them on (CLI and Job output)."""

    def __init__(self, inner: TextIO) -> None:
        self.inner = inner
        self._buffer = ""

    def write(self, text: str) -> int:
        self._buffer += text
        if "\n" in self._buffer:
            lines, _, self._buffer = self._buffer.rpartition("\n")
            self.inner.write(redact(lines + "\n"))
        return len(text)

    def flush(self) -> None:
        if self._buffer:
            self.inner.write(redact(self._buffer))
            self._buffer = ""
        self.inner.flush()

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.inner, "encoding", "utf-8")

    def fileno(self) -> int:
        return self.inner.fileno()


def redact_std_streams() -> None:
    """stdout and stderr of this process go through redaction (idempotent)."""
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)


# Variables a Job's pod (and the operator's) gets from Secrets: their values are remembered at start.
SECRET_ENV = ("PGSCALE_DB_PASSWORD", "PGSCALE_DB_URI", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "PGPASSWORD")


def remember_environment() -> None:
    """Secret-backed environment variables of this process, remembered like a Secret's values."""
    import os

    remember_secret({name: os.environ[name] for name in SECRET_ENV if os.environ.get(name)})


def forget_all() -> None:
    """Drop every remembered value (tests)."""
    global _known_pattern
    with _lock:
        _known.clear()
        _known_pattern = None
