"""The Secret a DatabaseSplit publishes for the application: the connection of the database taking writes."""

from __future__ import annotations

import base64
from typing import Any

from ..kube import ObjectRef
from ..pg.connection import ConnInfo
from .builders import object_meta

COMPONENT = "database-split"


def quote(text: str, safe: str = "") -> str:
    """Percent-encode everything but RFC 3986's unreserved characters (for the URI's user, password, dbname)."""
    unreserved = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~" + safe)
    return "".join(c if c in unreserved else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def connection_secret(owner: ObjectRef, name: str, info: ConnInfo, side: str) -> dict[str, Any]:
    """CloudNativePG's layout (uri, host, port, dbname, username, password), so an application that reads
    a CloudNativePG app Secret reads this one; the label pgscale.io/writes-to says which side it names."""
    auth = quote(info.user, safe="") + (f":{quote(info.password, safe='')}" if info.password is not None else "")
    uri = f"postgresql://{auth}@{info.host}:{info.port}/{quote(info.dbname, safe='')}"
    if info.sslmode:
        uri += f"?sslmode={quote(info.sslmode, safe='')}"
    data = {"uri": uri, "host": info.host, "port": str(info.port), "dbname": info.dbname, "username": info.user}
    if info.password is not None:
        data["password"] = info.password
    meta = object_meta(owner, name, COMPONENT)
    meta["labels"]["pgscale.io/writes-to"] = side
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "data": {k: _b64(v) for k, v in data.items()},
    }
