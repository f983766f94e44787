from __future__ import annotations

import pytest

from pgscale.api.databaseprofile import ConnectionSpec
from pgscale.errors import DependencyError
from pgscale.pg.connection import resolve


def spec(**extra: object) -> ConnectionSpec:
    return ConnectionSpec.model_validate({"secretRef": {"name": "db"}, **extra})


def test_cloudnativepg_uri() -> None:
    info = resolve(spec(), {"uri": "postgresql://app:pw@app-rw.ns:5432/app", "username": "app"}, "db")
    assert (info.host, info.port, info.dbname, info.user, info.password) == ("app-rw.ns", 5432, "app", "app", "pw")


def test_cloudnativepg_keys_without_uri() -> None:
    secret = {"host": "h", "port": "6432", "dbname": "d", "user": "u", "password": "p"}
    info = resolve(spec(), secret, "db")
    assert (info.host, info.port, info.dbname, info.user) == ("h", 6432, "d", "u")


def test_zalando_secret_with_host_in_spec() -> None:
    info = resolve(spec(host="acid-minimal", dbname="foo"), {"username": "zalando", "password": "x"}, "db")
    assert (info.host, info.port, info.dbname, info.user) == ("acid-minimal", 5432, "foo", "zalando")


def test_spec_overrides_secret() -> None:
    info = resolve(spec(port=7000, sslmode="require"), {"uri": "postgresql://u:p@h:5432/d"}, "db")
    assert info.port == 7000 and info.kwargs()["sslmode"] == "require"


def test_missing_host_names_the_fix() -> None:
    with pytest.raises(DependencyError) as err:
        resolve(spec(), {"username": "u", "password": "p"}, "creds")
    assert "host" in err.value.message and "creds" in err.value.message and "spec.connection.host" in err.value.message


def test_describe_hides_password() -> None:
    info = resolve(spec(), {"uri": "postgresql://u:secret@h/d"}, "db")
    assert "secret" not in info.describe()
