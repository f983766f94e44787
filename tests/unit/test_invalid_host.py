"""Regression (fuzz, seed 4): a host name the resolver cannot encode (a label over 63 characters, a character
no host name has) was an InternalError (UnicodeError from IDNA); it is a Stalled InvalidHost naming the fields.
Real psycopg: the host is refused before any connection is tried."""

from __future__ import annotations

import pytest

from pgscale import pg
from pgscale.errors import DependencyError
from pgscale.pg.connection import ConnInfo


@pytest.mark.parametrize("host", ["a" * 64 + ".example", "db.\U00108058.example", "\udc80"])
def test_a_host_the_resolver_cannot_encode_is_invalid_host(host: str) -> None:
    info = ConnInfo(host=host, port=5432, dbname="app", user="app", password="s3cret-pw")
    with pytest.raises(DependencyError) as caught, pg.connect(info):
        pass
    assert caught.value.reason == "InvalidHost" and caught.value.stalled
    assert "spec.connection.host" in caught.value.message and "s3cret-pw" not in caught.value.message
