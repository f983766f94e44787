"""From a DatabaseProfile's connection spec and its Secret to libpq parameters.

Pure: no I/O. Accepts the layouts CloudNativePG (``uri``, ``host``, ``port``,
``dbname``, ``username``/``user``, ``password``) and Zalando (``username``,
``password`` only) generate; explicit spec fields win over the Secret.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from psycopg.conninfo import conninfo_to_dict

from ..api.databaseprofile import ConnectionSpec, SecretKeys
from ..errors import DependencyError

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
    parts: dict[str, Any] = {}
    if keys.uri in secret:
        try:
            parsed = conninfo_to_dict(secret[keys.uri])
        except Exception as exc:  # psycopg raises ProgrammingError for malformed URIs
            raise DependencyError(
                f"Secret {secret_name!r} key {keys.uri!r} is not a valid postgresql:// URI: {exc}",
                reason="InvalidSecret",
            ) from exc
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
    except ValueError as exc:
        raise DependencyError(
            f"Secret {secret_name!r}: port {parts.get('port')!r} is not a number", reason="InvalidSecret"
        ) from exc
    return ConnInfo(
        host=str(parts["host"]),
        port=port,
        dbname=str(parts["dbname"]),
        user=str(parts["user"]),
        password=parts.get("password"),
        sslmode=parts.get("sslmode"),
        connect_timeout=spec.connect_timeout_seconds,
    )
