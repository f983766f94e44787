"""The SQL blocks of the docs, run by the tests that prove them (docs/databaseprofile.md,
"What the database role needs"): the statements of the first ```sql block under a heading."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sql_block(heading: str, page: str = "databaseprofile.md") -> list[tuple[str | None, str]]:
    """(database, statement) pairs of the first ```sql block after the line `heading`: a psql `\\c db`
    line switches the database of the statements after it (None: the connection's own); comments go."""
    text = (ROOT / "docs" / page).read_text()
    start = text.index("\n" + heading + "\n")
    block = re.search(r"```sql\n(.*?)```", text[start:], re.S)
    assert block is not None, f"no sql block under {heading!r}"
    out: list[tuple[str | None, str]] = []
    database: str | None = None
    for line in block.group(1).splitlines():
        line = line.split("--", 1)[0].strip()
        if line.startswith("\\c "):
            database = line.split()[1]
        elif line:
            assert line.endswith(";"), f"one statement per line in the docs: {line!r}"
            out.append((database, line[:-1]))
    return out


def renamed(statements: list[tuple[str | None, str]], names: dict[str, str]) -> list[tuple[str | None, str]]:
    """The statements with identifiers (whole words) replaced, for a shared server."""

    def sub(text: str) -> str:
        for old, new in names.items():
            text = re.sub(rf"\b{re.escape(old)}\b", new, text)
        return text

    return [(sub(db) if db else None, sub(stmt)) for db, stmt in statements]
