"""Planning of a RetentionPolicy run: spec + catalog facts -> what a batch touches.

Pure: the controller and the job read the catalog (pg layer) and pass the facts
in; everything decided from them is here and unit-tested.
"""

from __future__ import annotations

from .api.retentionpolicy import RetentionPolicySpec
from .durations import Age
from .errors import SpecError
from .pg import Column
from .pg.retention import Filter, Target, archive_problems


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


def plan(
    spec: RetentionPolicySpec,
    columns: dict[str, Column],
    *,
    key_columns: list[str],
    partitioned: bool,
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
