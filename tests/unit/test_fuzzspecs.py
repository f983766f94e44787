"""The fuzz suite's spec generator (tests/fuzzspecs.py): seeded, every kind, hostile values within the schema."""

from __future__ import annotations

import json
import re
from typing import Any

from fuzzspecs import KINDS, crd_schema, generate, generate_isolated


def _patterns(schema: dict[str, Any], path: str = "spec") -> dict[str, str]:
    # As the API server reads them: Go's \s is ASCII whitespace (Python's also takes \x1c-\x1f and more).
    out: dict[str, str] = {}
    if "pattern" in schema and schema.get("type") == "string":
        out[path] = schema["pattern"].replace(r"\s", r" \t\n\f\r")
    for key, sub in (schema.get("properties") or {}).items():
        out |= _patterns(sub, f"{path}.{key}")
    return out


def _strings(value: object, path: str = "spec") -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _strings(v, f"{path}.{k}")]
    return [(path, value)] if isinstance(value, str) else []


def test_the_same_seed_gives_the_same_specs_and_covers_every_kind() -> None:
    first, second = generate(150, 7), generate(150, 7)
    assert first == second
    assert {kind for kind, _ in first} == set(KINDS)
    assert len({json.dumps(p, sort_keys=True) for p in first}) > 80


def test_strings_match_the_crd_patterns() -> None:
    patterns = {kind: _patterns(crd_schema(kind)) for kind in KINDS}
    checked = 0
    for kind, spec in generate(60, 11):
        for path, value in _strings(spec):
            if path in patterns[kind]:
                assert re.fullmatch(patterns[kind][path], value), (kind, path, value)
                checked += 1
    assert checked > 80


def test_isolated_generation_does_not_depend_on_the_loaded_modules() -> None:
    assert generate_isolated(40, 5) == generate_isolated(40, 5)
