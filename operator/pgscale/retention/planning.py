"""Planning of a RetentionPolicy run: spec + catalog facts -> what a batch touches.

Pure: the controller and the job read the catalog (pg layer) and pass the facts
in; everything decided from them is here and unit-tested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..api.retentionpolicy import ChildrenSpec, RetentionPolicySpec
from ..durations import Age
from ..errors import SpecError
from ..pg import Column
from ..pg.relationships import DESTRUCTIVE, MAX_EDGES, ForeignKey
from ..pg.retention import ChildPlan, Filter, Target, archive_problems

MAX_DEPTH = 8
MAX_PLANS = 64


def archive_name(spec: RetentionPolicySpec) -> tuple[str, str] | None:
    """(schema, table) of the archive, or None for action delete."""
    if spec.action != "archive":
        return None
    archive = spec.archive
    schema = (archive.schema_ if archive else None) or spec.table.schema_
    table = (archive.table if archive else None) or f"{spec.table.name}_archive"
    if len(table) > 63:
        raise SpecError("archive.table", f"the default archive name {table!r} is longer than 63 bytes; set it")
    if (schema, table) == (spec.table.schema_, spec.table.name):
        raise SpecError("archive.table", "the archive cannot be the table itself")
    return schema, table


@dataclass(frozen=True)
class TableFacts:
    """What the planner needs to know of a referencing table (read from the catalog by the caller)."""

    columns: tuple[str, ...]
    partitioned: bool = False


@dataclass(frozen=True)
class Listed:
    """One foreign key as status shows it, with the chain of keys that leads to it from the table."""

    fk: ForeignKey
    mode: str | None
    effect: str  # as ChildPlan.effect, or "unset"
    chain: tuple[ForeignKey, ...]


@dataclass
class Relationships:
    """The planned handling of every foreign key reachable from the table, and what stops a run."""

    plans: tuple[ChildPlan, ...] = ()
    unresolved: list[ForeignKey] = field(default_factory=list)  # destructive, and children.mode unset
    listed: list[Listed] = field(default_factory=list)


def effect_of(mode: str | None, action: str, *, listed: bool = False) -> str | None:
    """What a run does to rows that reference a removed row (None: the spec must say).

    A RESTRICT / NO ACTION reference says "not while children exist": its parents are
    skipped, unless the table is listed in children.tables with mode archive.
    """
    if action not in DESTRUCTIVE:
        return "archive" if listed and mode == "archive" else "skipParent"
    if mode == "archive":
        return "archive"
    if mode == "keep":
        return "skipParent"
    if mode == "delete":
        return {"CASCADE": "delete", "SET NULL": "setNull", "SET DEFAULT": "setDefault"}[action]
    return None


def child_archive(spec: RetentionPolicySpec, fk: ForeignKey) -> tuple[str, str]:
    """(schema, table) of a referencing table's archive: the policy's archive schema if set, else its own."""
    children = spec.children_or_default
    table = children.archive_table_of(fk.schema, fk.table) or f"{fk.table}_archive"
    if len(table.encode()) > 63:
        raise SpecError(
            "children.tables",
            f"the default archive name {table!r} of {fk.schema}.{fk.table} is longer than 63 bytes; "
            "set archiveTable for it",
        )
    schema = (spec.archive.schema_ if spec.archive else None) or fk.schema
    if (schema, table) == fk.child:
        raise SpecError("children.tables", f"the archive of {fk.schema}.{fk.table} cannot be the table itself")
    return schema, table


def plan_relationships(
    spec: RetentionPolicySpec, edges: list[ForeignKey], facts: dict[tuple[str, str], TableFacts]
) -> Relationships:
    """Decide, for every foreign key that reaches the rows a run removes, what happens through it.

    Recursive: the children of archived or deleted children face the same choice. Refused
    with a SpecError: a cycle through other tables, more than MAX_DEPTH levels or
    MAX_PLANS keys. A self-reference archives or deletes descendants with their parent.
    """
    if len(edges) > MAX_EDGES:
        raise SpecError(
            "children",
            f"more than {MAX_EDGES} foreign keys reach {spec.table.qualified()}; pgscale cannot plan runs for it",
            reason="TooManyRelationships",
        )
    children: ChildrenSpec = spec.children_or_default
    by_parent: dict[tuple[str, str], list[ForeignKey]] = {}
    for fk in edges:
        by_parent.setdefault(fk.parent, []).append(fk)
    out = Relationships()
    root = (spec.table.schema_, spec.table.name)

    def expand(
        table: tuple[str, str], path: tuple[tuple[str, str], ...], chain: tuple[ForeignKey, ...]
    ) -> tuple[ChildPlan, ...]:
        plans = []
        for fk in by_parent.get(table, []):
            if len(out.listed) >= MAX_PLANS:
                raise SpecError(
                    "children",
                    f"more than {MAX_PLANS} foreign-key paths reach "
                    f"{spec.table.qualified()}; pgscale cannot plan runs for it",
                    reason="TooManyRelationships",
                )
            mode = children.mode_of(fk.schema, fk.table)
            listed = any((t.schema_, t.name) == fk.child for t in children.tables)
            effect = effect_of(mode, fk.action, listed=listed)
            if effect is None:
                out.unresolved.append(fk)
                effect = "unset"
            out.listed.append(Listed(fk, mode, effect, (*chain, fk)))
            if effect == "unset":
                continue
            archive = None
            if effect == "archive" and spec.action == "archive":  # export: the rows go to files instead
                archive = archive_name(spec) if fk.child == root else child_archive(spec, fk)
            sub: tuple[ChildPlan, ...] = ()
            if effect in ("archive", "delete") and not fk.self_reference:
                if fk.child in path:
                    loop = " -> ".join(f"{s}.{t}" for s, t in (*path, fk.child))
                    raise SpecError(
                        "children",
                        f"foreign keys form a cycle ({loop});  pgscale cannot archive "
                        "through it: set mode keep for one of these tables",
                        reason="ForeignKeyCycle",
                    )
                if len(path) >= MAX_DEPTH:
                    raise SpecError(
                        "children",
                        f"foreign keys nest deeper than {MAX_DEPTH} levels below {spec.table.qualified()}",
                        reason="TooManyRelationships",
                    )
                sub = expand(fk.child, (*path, fk.child), (*chain, fk))
            info = facts.get(fk.child, TableFacts(()))
            plans.append(
                ChildPlan(
                    fk=fk,
                    effect=effect,
                    mode=mode,
                    archive_schema=archive[0] if archive else None,
                    archive_table=archive[1] if archive else None,
                    columns=info.columns,
                    partitioned=info.partitioned,
                    children=sub,
                )
            )
        return tuple(plans)

    out.plans = expand(root, (root,), ())
    _check_archives(spec, out.plans)
    return out


def _check_archives(spec: RetentionPolicySpec, plans: tuple[ChildPlan, ...]) -> None:
    """Each archive table takes the rows of one table only: rows of two tables in one archive
    could no longer be told apart (and their keys could collide)."""
    owner: dict[tuple[str, str], tuple[str, str]] = {}
    root = archive_name(spec)
    if root is not None:
        owner[root] = (spec.table.schema_, spec.table.name)
    stack = list(plans)
    while stack:
        plan = stack.pop()
        stack.extend(plan.children)
        if plan.archive_table is None or plan.fk.self_reference:
            continue
        name = (plan.archive_schema or plan.fk.schema, plan.archive_table)
        if owner.setdefault(name, plan.fk.child) != plan.fk.child:
            other = owner[name]
            raise SpecError(
                "children.tables",
                f'the archive table "{name[0]}"."{name[1]}" would receive the rows of both "{other[0]}"."{other[1]}" '
                f'and "{plan.fk.schema}"."{plan.fk.table}": set archiveTable for one of them',
                reason="ArchiveConflict",
            )


def plan(
    spec: RetentionPolicySpec,
    columns: dict[str, Column],
    *,
    key_columns: list[str],
    partitioned: bool,
    children: tuple[ChildPlan, ...] = (),
) -> Target:
    """The batch target for a spec, given the source table's columns and primary key."""
    archive = archive_name(spec)
    return Target(
        schema=spec.table.schema_,
        table=spec.table.name,
        columns=tuple(columns),
        age_column=spec.age_column,
        age_interval=Age.parse(spec.older_than).interval(),
        filters=tuple(Filter(f.column, f.operator, tuple(f.values or ())) for f in spec.filters),
        archive_schema=archive[0] if archive else None,
        archive_table=archive[1] if archive else None,
        batch_size=spec.batch_size,
        partitioned=partitioned,
        key_columns=tuple(key_columns),
        children=children,
        max_batch_size=spec.batch_limit,
    )


def check_archive(spec: RetentionPolicySpec, source: dict[str, Column], archive: dict[str, Column] | None) -> None:
    """An existing archive must take every source column unchanged; a missing one must be creatable."""
    name = archive_name(spec)
    if name is None:
        return
    if archive is None:
        if spec.archive is not None and not spec.archive.create:
            raise SpecError(
                "archive.create",
                f'archive table "{name[0]}"."{name[1]}" does not exist and archive.create is false: '
                "create it or set archive.create: true",
                reason="ArchiveNotFound",
            )
        return
    problems = archive_problems(source, archive)
    if problems:
        raise SpecError(
            "archive.table",
            f'archive table "{name[0]}"."{name[1]}" cannot hold the rows: {"; ".join(problems)}. '
            "Add the columns or name another archive table",
            reason="ArchiveMismatch",
        )


BATCH_TIME_SHARE = 0.1  # a batch aims at this share of lockTimeout: what a writer may wait on its rows
BATCH_STALL_SHARE = 0.5  # a batch above its smallest size is cut short (and halved) when it takes this share


def batch_aim(budget: float) -> float:
    """How long a batch should take, in seconds, given lockTimeout (``budget``)."""
    return max(budget * BATCH_TIME_SHARE, 0.01)


def row_lock_wait(budget: float) -> float:
    """How long a batch's DELETE waits for a row another transaction holds locked, in seconds, before
    the batch is rolled back and run again with SKIP LOCKED (which waits for no row). Short: while it
    waits, the rows it already took stay locked for everyone else."""
    return batch_aim(budget)


def batch_cap(budget: float, statement_timeout: float) -> float:
    """The statement timeout of a batch larger than its smallest size: past this it is rolled back and
    run again at half its size, so no batch holds its rows for long (a run over sparse pages grows its
    ranges, and the next range may be dense). 0: no limit."""
    caps = [t for t in (budget * BATCH_STALL_SHARE, statement_timeout) if t > 0]
    return min(caps) if caps else 0.0


def batch_pages(batch_size: int, max_batch_size: int, rows_per_page: float) -> tuple[int, int]:
    """(smallest, largest) batch in heap pages: ranges that hold about batchSize and maxBatchSize rows."""
    density = max(rows_per_page, 1.0)
    smallest = max(1, math.ceil(batch_size / density))
    return smallest, max(smallest, int(max(max_batch_size, batch_size) / density))


EXPLORING = 8  # after a batch that moved no row, the next covers at most this many times the smallest


def next_batch_size(size: int, elapsed: float, *, moved: int, budget: float, smallest: int, largest: int) -> int:
    """The next batch's size (in pages), from how long this one took (pure).

    Batches grow (doubling) while one takes under half the aim, and shrink in proportion
    when one takes longer than the aim, so each stays far under the lock budget whatever
    the row width, the share of matching rows, the indexes and the machine's load. A batch
    that moved nothing only read its pages, which says little of how long moving rows takes:
    the next one stays within EXPLORING times the smallest size (pages with matching rows
    may follow).
    """
    aim = batch_aim(budget)
    if elapsed > aim:
        return max(smallest, min(size, int(size * aim / elapsed)))
    if elapsed < aim / 2:
        grown = min(largest, size * 2)
        return grown if moved else max(smallest, min(grown, smallest * EXPLORING))
    return size


def next_export_pages(pages: int, moved: int, rows_per_file: int, largest: int) -> int:
    """The next export batch's size in heap pages (pure): aimed at rowsPerFile rows from how many the
    last one found, growing at most 4x per batch and never past ``largest`` (a range of old rows after
    many young pages would otherwise make one huge batch)."""
    if moved <= 0:
        return min(largest, pages * 2)
    return max(1, min(largest, pages * 4, int(pages * rows_per_file / moved)))
