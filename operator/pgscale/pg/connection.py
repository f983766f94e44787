"""From a DatabaseProfile's connection spec and its Secret to libpq parameters.

Pure: no I/O. Accepts the layouts CloudNativePG (``uri``, ``host``, ``port``,
``dbname``, ``username``/``user``, ``password``) and Zalando (``username``,
``password`` only) generate; explicit spec fields win over the Secret.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from ..api.databaseprofile import ConnectionSpec, SecretKeys
from ..errors import DependencyError
from ..redact import remember, remember_secret

APPLICATION_NAME = "pgscale"


@dataclass(frozen=True)
class ConnInfo:
    """Everything psycopg needs to reach one database."""

    host: str
    port: int
    dbname: str
    user: str
    password: str | None = None
    sslmode: str | None = None
    connect_timeout: int = 10
    application_name: str = APPLICATION_NAME

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for psycopg.connect."""
        params: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "connect_timeout": self.connect_timeout,
            "application_name": self.application_name,
        }
        if self.password is not None:
            params["password"] = self.password
        if self.sslmode:
            params["sslmode"] = self.sslmode
        return params

    def with_database(self, dbname: str) -> ConnInfo:
        """The same server, another database."""
        return replace(self, dbname=dbname)

    def describe(self) -> str:
        """host:port/dbname as user, without the password, for messages."""
        return f"{self.user}@{self.host}:{self.port}/{self.dbname}"


def resolve(spec: ConnectionSpec, secret: dict[str, str], secret_name: str) -> ConnInfo:
    """Combine spec and Secret; a missing piece raises DependencyError naming the key."""
    keys = spec.secret_ref.keys or SecretKeys()
    remember_secret(secret)
    parts: dict[str, Any] = {}
    if keys.uri in secret:
        raw = secret[keys.uri]
        try:
            parsed = conninfo_to_dict(raw)
        except Exception:  # psycopg's text quotes the input, password included: never pass it on
            raise DependencyError(
                f"Secret {secret_name!r} key {keys.uri!r} is not a valid connection string: {uri_problem(raw)}",
                reason="InvalidSecret",
            ) from None
        remember(str(parsed.get("password") or ""))
        parts.update({k: v for k, v in parsed.items() if v not in (None, "")})
    for field in ("host", "port", "dbname", "password"):
        key = getattr(keys, field)
        if key in secret and secret[key] != "":
            parts.setdefault(field, secret[key])
    for key in (keys.user, "user", "username"):
        if key in secret and secret[key] != "":
            parts.setdefault("user", secret[key])
            break
    for field in ("host", "port", "dbname", "sslmode"):
        value = getattr(spec, field)
        if value is not None:
            parts[field] = value
    missing = [f for f in ("host", "dbname", "user") if not parts.get(f)]
    if missing:
        raise DependencyError(
            f"connection has no {', '.join(missing)}: add the key(s) to Secret {secret_name!r} "
            f"(or a `{keys.uri}` URI), or set spec.connection.{missing[0]}",
            reason="InvalidSecret",
        )
    try:
        port = int(parts.get("port", 5432))
    except ValueError:
        port = -1  # the value is not quoted: a URI without a host puts the password where the port goes
    if not 1 <= port <= 65535:
        raise DependencyError(
            f"Secret {secret_name!r}: the port (in key {keys.port!r} or the {keys.uri!r} URI) is not a number "
            "from 1 to 65535; if the URI has no host, its password is read as a port",
            reason="InvalidSecret",
        )
    return ConnInfo(
        host=str(parts["host"]),
        port=port,
        dbname=str(parts["dbname"]),
        user=str(parts["user"]),
        password=parts.get("password"),
        sslmode=parts.get("sslmode"),
        connect_timeout=spec.connect_timeout_seconds,
    )


def uri_problem(raw: str) -> str:
    """What is wrong with a connection string libpq rejected, in words that quote none of it."""
    text = raw.strip()
    if re.match(r"(?i)^postgres(ql)?://", text):
        hint = "percent-encode special characters in the user name and password (@ is %40, space %20, % is %25)"
        authority = text.split("://", 1)[1].split("/", 1)[0]
        if "[" in authority and "]" not in authority:
            return f"an IPv6 host opened with [ is not closed with ]; {hint}"
        if re.search(r"%(?![0-9A-Fa-f]{2})", text):
            return f"a % is not followed by two hex digits (an invalid percent-escape); {hint}"
        if re.search(r"\s", text):
            return f"it contains a space; {hint}"
        if "?" in text:
            return f"a query parameter after ? is not key=value; {hint}"
        return f"libpq cannot parse the URI; {hint}"
    if "://" in text.split("=", 1)[0] or "=" not in text:
        return "it is neither a postgresql:// URI nor key=value words (host, port, dbname, user, password)"
    if text.count("'") % 2 == 1 or re.search(r"=\s*'(?:[^'\\]|\\.)*$", text):
        return "a quoted value is not closed (quote values with spaces as key='value', escape ' as \\')"
    return "a key=value pair is malformed (each word must be key=value; quote values with spaces as key='value')"
