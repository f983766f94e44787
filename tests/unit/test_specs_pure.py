"""The builders in pgscale.specs do no I/O: they import nothing that talks to a server or a file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from pgscale import specs

SPECS = sorted(Path(specs.__file__).parent.glob("*.py"))
FORBIDDEN = {"psycopg", "kubernetes", "kopf", "boto3", "botocore", "requests", "urllib", "socket", "subprocess"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_builders_import_nothing_that_does_io(path: Path) -> None:
    tree = ast.parse(path.read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.level == 2 and node.module == "kube":
            assert {a.name for a in node.names} == {"ObjectRef"}, "from ..kube only the ObjectRef value type"
    assert not imported & FORBIDDEN
    assert "open(" not in path.read_text()
