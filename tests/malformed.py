"""Malformed connection strings, each carrying PASSWORD, for the redaction tests (unit and e2e).

Each is the data of a Secret; the ones libpq accepts point at a closed port on
loopback, so the real code path runs to a connection attempt and fails there.
"""

from __future__ import annotations

PASSWORD = "pgs-Leak-7Qx9"  # the value the tests hunt for
LOOP = "127.0.0.1:1"  # nothing listens: a connection attempt fails at once

CASES: dict[str, dict[str, str]] = {
    "unclosed-ipv6-bracket": {"uri": f"postgresql://app:{PASSWORD}@[::1/db"},
    "bad-percent-escape": {"uri": f"postgresql://app:{PASSWORD}%zz@{LOOP}/db"},
    "trailing-percent": {"uri": f"postgresql://app:{PASSWORD}%@{LOOP}/db"},
    "dsn-unterminated-quote": {"uri": f"host=127.0.0.1 port=1 dbname=db user=app password='{PASSWORD}"},
    "dsn-stray-quote": {"uri": f"host=127.0.0.1 port=1 dbname=db user=app password={PASSWORD} 'x"},
    "dsn-double-quoted-no-equals": {"uri": f'host=127.0.0.1 password = "{PASSWORD}" dbname'},
    "dsn-empty-key": {"uri": f"host=127.0.0.1 user=app password={PASSWORD} ="},
    "space-in-password": {"uri": f"postgresql://app:{PASSWORD} with space@{LOOP}/db"},
    "unicode-password": {"uri": f"postgresql://app:{PASSWORD}ü€@{LOOP}/db"},
    "at-in-password": {"uri": f"postgresql://app:{PASSWORD}@x@{LOOP}/db"},
    "no-host-password-as-port": {"uri": f"postgresql://app:{PASSWORD}"},
    "empty-host": {"uri": f"postgresql://app:{PASSWORD}@/db"},
    "huge-port": {"uri": f"postgresql://app:{PASSWORD}@127.0.0.1:99999999999999/db"},
    "word-port": {"uri": f"postgresql://app:{PASSWORD}@127.0.0.1:port/db"},
    "mysql-scheme": {"uri": f"mysql://app:{PASSWORD}@{LOOP}/db"},
    "one-slash-scheme": {"uri": f"postgres:/app:{PASSWORD}@{LOOP}/db"},
    "query-without-value": {"uri": f"postgresql://app:{PASSWORD}@{LOOP}/db?sslmode=require&x"},
    "newline-in-uri": {"uri": f"postgresql://app:{PASSWORD}\n@{LOOP}/db"},
    "quote-in-password": {"uri": f"postgresql://app:{PASSWORD}'\"@{LOOP}/db"},
    "password-key-and-bad-uri": {"uri": "postgresql://app@[::1/db", "password": PASSWORD},
}
