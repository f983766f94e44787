"""What the Cache controller, the relay and the SQL layer share: key templates, sizing and names.

Pure: no connection, no clock. A key template (``task:{id}``) is parsed into constant text and
column names here; pg/cache.py turns it into a SQL expression (sql.Literal for the text,
sql.Identifier for the columns), so no spec text ever becomes SQL.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass

from .api.cache import CacheSpec, InvalidateRule
from .api.common import TableReference
from .api.databaseprofile import DatabaseProfileSpec
from .errors import SpecError
from .quantity import parse_quantity

MI = 1024 * 1024
GI = 1024 * MI
# The cache container's memory by the profile's tier; a profile with resources instead gets 1/16 of
# the database's memory, between the smallest and largest tier's.
TIER_MEMORY: dict[str, int] = {"development": 256 * MI, "production": 1 * GI, "high-load": 4 * GI}
DEFAULT_MEMORY = TIER_MEMORY["development"]
MIN_MAXMEMORY = 16 * MI  # below this a cache thrashes; the CRD allows tiny memory, the controller refuses it

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_$]*)\}")
_TEXT = re.compile(r"[^{}\s\x00-\x1f\x7f]+")


@dataclass(frozen=True)
class Template:
    """A parsed key template: constant text (str) and column references (Column), in order."""

    source: str
    parts: tuple[str | Column, ...]

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parts if isinstance(p, Column))

    def glob(self) -> str:
        """The Redis glob matching every key of the template (placeholders as *), for a TRUNCATE."""
        out = []
        for part in self.parts:
            out.append("*" if isinstance(part, Column) else re.sub(r"([*?\[\]\\])", r"\\\1", part))
        return "".join(out)

    def render(self, row: dict[str, object]) -> str | None:
        """The key for a row as Python sees it (tests and docs); None when a column is NULL, as in SQL."""
        out = []
        for part in self.parts:
            if isinstance(part, Column):
                value = row[part.name]
                if value is None:
                    return None
                out.append(str(value))
            else:
                out.append(part)
        return "".join(out)


@dataclass(frozen=True)
class Column:
    name: str


def parse_template(text: str) -> Template:
    """`task:{id}` -> ("task:", Column("id")); ValueError for braces that are not a placeholder."""
    parts: list[str | Column] = []
    pos = 0
    while pos < len(text):
        match = _PLACEHOLDER.match(text, pos) or _TEXT.match(text, pos)
        if match is None:
            raise ValueError(
                f"key template {text!r}: unexpected {text[pos]!r} at {pos}; write constant text and {{column}} "
                "placeholders, e.g. task:{id}"
            )
        parts.append(Column(match.group(1)) if match.re is _PLACEHOLDER else match.group(0))
        pos = match.end()
    if not parts:
        raise ValueError("key template is empty")
    return Template(text, tuple(parts))


@dataclass(frozen=True)
class TablePlan:
    """One table's invalidation: its keys and tags as templates, checked against its columns."""

    table: TableReference
    keys: tuple[Template, ...]
    tags: tuple[Template, ...]

    @property
    def label(self) -> str:
        return f"{self.table.schema_}.{self.table.name}"


def plan_table(rule: InvalidateRule, index: int, columns: list[str] | None = None) -> TablePlan:
    """The rule's templates; with the table's columns, SpecError naming the field of an unknown column."""
    keys: list[Template] = []
    tags: list[Template] = []
    entries = [(f"invalidate[{index}].keys[{i}]", k, keys) for i, k in enumerate(rule.keys)]
    if rule.tag is not None:
        entries.append((f"invalidate[{index}].tag", rule.tag, tags))
    for field, text, into in entries:
        try:
            template = parse_template(text)
        except ValueError as exc:
            raise SpecError(field, str(exc), reason="InvalidKeyTemplate") from exc
        if columns is not None:
            for name in template.columns:
                if name not in columns:
                    near = [c for c in columns if c.lower() == name.lower()]
                    hint = f"; did you mean {{{near[0]}}} (names are case-sensitive)?" if near else ""
                    raise SpecError(
                        field,
                        f"{text!r} names column {name!r}, which {rule.table.qualified()} does not have{hint}; "
                        f"use one of its columns: {', '.join(columns)}",
                        reason="ColumnNotFound",
                    )
        into.append(template)
    return TablePlan(rule.table, tuple(keys), tuple(tags))


# --- sizing -----------------------------------------------------------------------------------


def container_memory(spec: CacheSpec, profile: DatabaseProfileSpec | None) -> int:
    """Bytes of the cache container: spec.memory, else by the profile's tier (or resources)."""
    if spec.memory is not None:
        try:
            return parse_quantity(spec.memory)
        except ValueError as exc:
            raise SpecError("memory", f"{exc}", reason="InvalidSpec") from exc
    if profile is not None and profile.tier is not None:
        return TIER_MEMORY[profile.tier]
    if profile is not None and profile.resources is not None:
        try:
            share = parse_quantity(profile.resources.memory) // 16
        except ValueError:  # the profile's own reconcile reports it
            return DEFAULT_MEMORY
        return min(max(share, TIER_MEMORY["development"]), TIER_MEMORY["high-load"])
    return DEFAULT_MEMORY


def maxmemory(spec: CacheSpec, memory: int) -> int:
    """maxmemory in bytes: the share of the container's memory spec.maxmemoryPercent gives, in whole MiB."""
    value = memory * spec.maxmemory_percent // 100 // MI * MI
    if value < MIN_MAXMEMORY:
        raise SpecError(
            "memory",
            f"maxmemory would be {value // MI}Mi ({spec.maxmemory_percent}% of {human(memory)}); give the cache "
            f"at least {MIN_MAXMEMORY * 100 // spec.maxmemory_percent // MI + 1}Mi of memory",
            reason="MemoryTooSmall",
        )
    return value


def human(nbytes: int) -> str:
    """192Mi, 3Gi: the largest binary unit that expresses the value exactly."""
    for unit, size in (("Gi", GI), ("Mi", MI), ("Ki", 1024)):
        if nbytes % size == 0 and nbytes >= size:
            return f"{nbytes // size}{unit}"
    return str(nbytes)


def new_password() -> str:
    """64 hex digits: nothing a config file or a URL would need to quote."""
    return secrets.token_hex(32)


# --- names --------------------------------------------------------------------------------------


def cache_id(namespace: str, name: str) -> str:
    """12 hex digits naming a Cache's objects in the database (names are at most 63 bytes there)."""
    return hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:12]


def outbox_table(cid: str) -> str:
    return f"cache_outbox_{cid}"


def stats_table(cid: str) -> str:
    """Where the relay keeps the server's INFO for the controller's conditions."""
    return f"cache_stats_{cid}"


def trigger_name(cid: str) -> str:
    return f"pgscale_cache_{cid}"


def truncate_trigger_name(cid: str) -> str:
    return f"pgscale_cache_{cid}_truncate"


def function_prefix(cid: str) -> str:
    return f"cache_{cid}_"


def function_name(cid: str, table: TableReference) -> str:
    """One trigger function per table: its keys are expressions over that table's columns."""
    digest = hashlib.sha256(f"{table.schema_}\x00{table.name}".encode()).hexdigest()[:10]
    return f"{function_prefix(cid)}{digest}"


def truncate_function_name(cid: str, table: TableReference) -> str:
    """The statement trigger's function: a TRUNCATE has no rows, so it invalidates by pattern."""
    return function_name(cid, table) + "_t"


def channel(cid: str) -> str:
    """The NOTIFY channel that wakes the relay."""
    return f"pgscale_cache_{cid}"
