"""Hypothesis strategies for schema-valid but hostile specs of every pgscale kind.

The strategies are derived from the generated CRDs in crds/ (openAPIV3Schema), so a new
field is fuzzed as soon as the CRD has it: objects with their required and a random
subset of optional properties, enums, patterns (``from_regex``), bounds (biased to the
edges), int-or-string quantities, maps and lists within their limits. Some fields get
extra hostile candidates on top of their pattern (by property name or pattern):

- identifiers: the sample application's real tables and columns (so the operator gets
  past "does not exist" to the deeper checks), case twins, system catalogs and columns,
  reserved words, 63-character names, ``$``;
- references: the namespace's profile and Secrets that exist, ones that do not, and
  Secrets that exist but are unusable;
- durations, ages, cron schedules and time zones at their edges.

CEL rules are not modelled: the API server rejects what breaks them, which the fuzz test
records (rejections are a fine outcome). Used by tests/e2e/test_fuzz.py and, without a
cluster, by tests/unit/test_fuzzspecs.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from pgscale import api

ROOT = Path(__file__).resolve().parent.parent
KINDS = {k.name: k.plural for k in api.KINDS}  # every kind the operator serves
IDENT = "^[A-Za-z_][A-Za-z0-9_$]*$"
DNS = "^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
DURATION = "^[0-9]{1,9}(ms|s|m|h|d|w)$"

# Names the fuzz namespaces hold (see test_fuzz.py): the profile and Secrets that exist.
# Weighted towards what exists, so most specs get past "not found" to the checks behind it.
PROFILES = ["app"] * 8 + ["missing-profile", "broken-profile"]
SECRETS = ["app-db"] * 6 + ["wrong-password", "no-keys", "s3-credentials", "missing-secret"]
TABLES = (
    ["Task"] * 4
    + ["Message"] * 2
    + ["File"] * 4
    + [
        "task",
        "TASK",
        "pg_class",
        "pg_stat_activity",
        "information_schema",
        "pgscale_state",
        "Task_pgscale_new",
        "_",
        "x" * 63,
        "a$b",
        "select",
        "user",
        "Nope",
    ]
)
COLUMNS = [
    "id",
    "id",
    "createdAt",
    "createdAt",
    "completedAt",
    "completedAt",
    "data",
    "status",
    "title",
    "userId",
    "taskId",
    "body",
    "data",
    "fileName",
    "mimeType",
    "size",
    "createdat",
    "ctid",
    "xmin",
    "tableoid",
    "oid",
    "filePath",
    "storageType",
    "_",
    "y" * 63,
    "order",
    "missing_column",
]
SCHEMAS = ["public", "public", "pg_catalog", "information_schema", "pgscale", "pg_toast", "missing_schema", "Public"]
DURATIONS = [
    "0s",
    "0ms",
    "1ms",
    "999ms",
    "1s",
    "59m",
    "24h",
    "1w",
    "999999999ms",
    "999999999s",
    "999999999d",
    "999999999w",
    "000000000s",
]
AGES = ["1d", "1 d", "99999y", "99999 years", "1mo", "12 months", "1 week", "52w", "1y"]
SCHEDULES = [
    "@hourly",
    "@yearly",
    "@midnight",
    "* * * * *",
    "*/1 * * * *",
    "0 0 29 2 *",
    "0 0 30 2 *",
    "0 0 31 4 *",
    "59 23 31 12 *",
    "0 0 * * 7",
    "0 0 1W * *",
    "0 0 L * *",
    "0 0 * * 5#3",
    "1W 1 1 1 1",
    "0 0 ? * MON-FRI",
    "60 24 32 13 8",
    "a b c d e",
    "0-59/61 * * * *",
    "* * * JAN-DEC SUN",
]
TIMEZONES = [
    "UTC",
    "Europe/Berlin",
    "Asia/Kathmandu",
    "Pacific/Kiritimati",
    "Etc/GMT+12",
    "Etc/GMT-14",
    "Mars/Olympus_Mons",
    "America/Argentina/Buenos_Aires",
    "EST5EDT",
    "Z",
    "posixrules",
]
PARAMETERS = [
    "work_mem",
    "maintenance_work_mem",
    "random_page_cost",
    "statement_timeout",
    "shared_buffers",
    "max_connections",
    "log_min_duration_statement",
    "effective_cache_size",
    "search_path",
    "default_transaction_isolation",
    "jit",
    "idle_in_transaction_session_timeout",
    "timezone",
    "pg_stat_statements.max",
    "no_such_setting",
    "custom.thing",
]
PARAMETER_VALUES = [
    "4MB",
    "0",
    "-1",
    "1",
    "999999999999999",
    "1e308",
    "NaN",
    "on",
    "off",
    "",
    "'",
    "\\",
    "64kB",
    "1TB",
    "2147483647",
    "-2147483648",
    '\'; DROP TABLE "Task"; --',
    "ünïcödé",
    "\u0000x",
]


def crd_schema(kind: str) -> dict[str, Any]:
    """The spec's openAPIV3Schema of a kind, as the generated CRD has it."""
    doc = yaml.safe_load((ROOT / "crds" / f"pgscale.io_{KINDS[kind]}.yaml").read_text())
    return dict(doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"])


def _bounded(strategy: st.SearchStrategy[str], schema: dict[str, Any]) -> st.SearchStrategy[str]:
    low, high = schema.get("minLength", 0), schema.get("maxLength", 10**6)
    return strategy.filter(lambda s: low <= len(s) <= high)


def _pattern(schema: dict[str, Any]) -> st.SearchStrategy[str]:
    pattern = schema["pattern"]
    # Go's regexp (the API server's) and Python's agree on these patterns; \s is ASCII in Go.
    return _bounded(st.from_regex(pattern.replace(r"\s", r" \t\n\f\r"), fullmatch=True), schema)


def _specials(path: tuple[str, ...], schema: dict[str, Any]) -> list[str]:
    """Hostile candidates for a string field, by its name and pattern (each still matches the pattern)."""
    name, parent = path[-1], path[-2] if len(path) > 1 else ""
    pattern = schema.get("pattern", "")
    out: list[str] = []
    if pattern == DNS:
        out = PROFILES if parent == "profileRef" else SECRETS if "ecret" in parent else ["default", "missing"]
    elif pattern == IDENT:
        out = SCHEMAS if name in ("schema", "archiveSchema") else TABLES if name in ("name", "table") else COLUMNS
    elif pattern == DURATION:
        out = DURATIONS
    elif name in ("olderThan", "keep"):
        out = AGES
    elif name == "schedule":
        out = SCHEDULES
    elif name == "timeZone":
        out = TIMEZONES
    elif name == "namingPattern":
        out = [
            "{table}_{YYYY}_{MM}_{DD}",
            "{table}_{YYYY}_{MM}",
            "{table}_{YYYY}",
            "{table}_{IYYY}_{IW}",
            "{table}_{YYYY}_{Q}",
            "p{YYYY}{MM}{DD}{IYYY}{IW}{Q}",
            "{table}{table}_{YYYY}{MM}{DD}{IYYY}{IW}{Q}",
            "x" * 50 + "{YYYY}{MM}{DD}",
        ] * 3
    elif name == "keyTemplate":
        out = ["{table}/{key}", "{key}", "{key}/{key}", "../{key}", "{table}/{nope}/{key}", "{key}" + "a" * 200] * 3
    elif path[-2:] == ("keys", "[]") or name == "tag":
        out = ["task:{id}", "user-tasks:{userId}", "{id}", "f:{fileName}", "x:{missing}", "{id}{id}", "q'\";--:{id}"]
    elif name == "endpoint":
        out = ["http://127.0.0.1:1", "https://s3.invalid", "http://[::1]:9", "http://user:pa55word@127.0.0.1:2/x"]
    ok = re.compile(pattern) if pattern else None
    low, high = schema.get("minLength", 0), schema.get("maxLength", 10**6)
    return [s for s in out if low <= len(s) <= high and (ok is None or ok.fullmatch(s))]


def _string(path: tuple[str, ...], schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    specials = _specials(path, schema)
    base = (
        _pattern(schema)
        if "pattern" in schema
        else _bounded(st.text(max_size=min(schema.get("maxLength", 64), 64)), schema)
    )
    if schema.get("maxLength", 0) > 300 and "pattern" not in schema:
        base = st.one_of(base, st.just("x" * schema["maxLength"]))
    if not specials:
        return base
    # References and identifiers mostly name what exists; the pattern's own values keep the rest honest.
    # (st.one_of leans to its first branch and shrinks towards it, so the odds are drawn explicitly.)
    cut = 8 if schema.get("pattern") in (DNS, IDENT) else 5
    return st.tuples(st.integers(0, 9), st.sampled_from(specials), base).map(lambda t: t[1] if t[0] < cut else t[2])


def _integer(schema: dict[str, Any]) -> st.SearchStrategy[int]:
    low, high = schema.get("minimum", -(2**31)), schema.get("maximum", 2**31 - 1)
    edges = sorted({low, high, min(low + 1, high), max(high - 1, low)})
    return st.one_of(st.sampled_from(edges), st.integers(low, high))


def _number(schema: dict[str, Any]) -> st.SearchStrategy[float]:
    low, high = schema.get("minimum", -1e9), schema.get("maximum", 1e9)
    excl = bool(schema.get("exclusiveMinimum"))
    return st.floats(low, high, exclude_min=excl, allow_nan=False, allow_infinity=False)


def _parameters_map(path: tuple[str, ...], schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]] | None:
    if path[-1] == "parameters" and path[-2:-1] == ("spec",):
        return st.dictionaries(st.sampled_from(PARAMETERS), st.sampled_from(PARAMETER_VALUES), max_size=4)
    return None


def strategy(schema: dict[str, Any], path: tuple[str, ...] = ("spec",)) -> st.SearchStrategy[Any]:
    """Values that satisfy the schema's structural constraints (not its CEL rules)."""
    if schema.get("x-kubernetes-int-or-string"):
        ints = st.integers(0, 2**40) if "pattern" in schema else st.integers()
        return st.one_of(ints, _pattern(schema)) if "pattern" in schema else st.one_of(ints, st.text(max_size=12))
    kind = schema.get("type")
    if kind == "string":
        return _string(path, schema)
    if kind == "integer":
        return _integer(schema)
    if kind == "number":
        return _number(schema)
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(strategy(schema["items"], (*path, "[]")), max_size=min(schema.get("maxItems", 4), 4))
    if kind == "object":
        props: dict[str, Any] = schema.get("properties") or {}
        if props:
            required = set(schema.get("required") or [])
            exclusive = _exactly_one(schema)
            if exclusive:  # a CEL rule `has(self.a) != has(self.b)`: one of them, as the API server wants
                return st.one_of(
                    *[
                        strategy(
                            {
                                **schema,
                                "properties": {k: v for k, v in props.items() if k not in exclusive or k == keep},
                                "required": [*required, keep],
                                "x-kubernetes-validations": [],
                            },
                            path,
                        )
                        for keep in exclusive
                    ]
                )
            return st.fixed_dictionaries(
                {k: strategy(v, (*path, k)) for k, v in props.items() if k in required},
                optional={k: strategy(v, (*path, k)) for k, v in props.items() if k not in required},
            )
        special = _parameters_map(path, schema)
        if special is not None:
            return st.one_of(special, _free_map(path, schema))
        return _free_map(path, schema)
    return st.none()


def _exactly_one(schema: dict[str, Any]) -> tuple[str, str] | None:
    for rule in schema.get("x-kubernetes-validations") or []:
        if m := re.fullmatch(r"has\(self\.(\w+)\) != has\(self\.(\w+)\)", rule["rule"]):
            return m.group(1), m.group(2)
    return None


def _free_map(path: tuple[str, ...], schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    values = schema.get("additionalProperties")
    if not isinstance(values, dict):
        return st.just({})
    keys = st.from_regex(r"[a-z][a-z0-9_]{0,20}", fullmatch=True)
    return st.dictionaries(keys, strategy(values, (*path, "{}")), max_size=min(schema.get("maxProperties", 3), 3))


@cache
def spec_strategy(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return strategy(crd_schema(kind))


def any_spec() -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    """A (kind, spec) of any kind."""
    return st.sampled_from(sorted(KINDS)).flatmap(lambda k: spec_strategy(k).map(lambda s: (k, s)))


def generate(n: int, seed_value: int) -> list[tuple[str, dict[str, Any]]]:
    """n (kind, spec) pairs, the same ones for the same seed (no example database, no shrinking)."""
    out: list[tuple[str, dict[str, Any]]] = []

    @seed(seed_value)
    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(any_spec())
    def collect(pair: tuple[str, dict[str, Any]]) -> None:
        out.append(pair)

    collect()
    return out


def generate_isolated(n: int, seed_value: int) -> list[tuple[str, dict[str, Any]]]:
    """generate() in a fresh interpreter that imports only this module.

    Hypothesis mixes literals from every local module loaded in the process into what it draws
    ("local constants"), so in a test process the specs would depend on which tests and operator
    modules happen to be imported. Alone, the same seed and this file give the same specs.
    """
    out = subprocess.run(
        [sys.executable, __file__, str(n), str(seed_value)],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent,
    )
    return [(kind, spec) for kind, spec in json.loads(out.stdout)]


if __name__ == "__main__":
    print(json.dumps(generate(int(sys.argv[1]), int(sys.argv[2]))))
