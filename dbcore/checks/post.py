"""Post-checks of a database after migrations: drift against the models and invalid indexes.

Every function here decides and returns data; the CLI prints it, the flow turns it into an
artifact and decides whether to roll back. The database is read, never written.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import peewee

from dbcore.checks.drift import DEFAULT_IGNORED_TABLES, DriftReport, opened, schema_drift
from dbcore.connection import Target
from dbcore.errors import ConfigError


@dataclass(frozen=True)
class InvalidIndex:
    """An index PostgreSQL does not use (pg_index.indisvalid is false), e.g. a failed CONCURRENTLY build."""

    schema: str
    table: str
    index: str
    definition: str

    def describe(self) -> str:
        return (f"index {self.schema}.{self.index} on {self.table} is invalid: "
                f"DROP INDEX {self.schema}.{self.index} and build it again")

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.describe()}


_INVALID_INDEXES = """
    SELECT n.nspname, t.relname, i.relname, pg_get_indexdef(x.indexrelid)
    FROM pg_index AS x
    JOIN pg_class AS i ON i.oid = x.indexrelid
    JOIN pg_class AS t ON t.oid = x.indrelid
    JOIN pg_namespace AS n ON n.oid = i.relnamespace
    WHERE NOT x.indisvalid
      AND n.nspname NOT IN ('pg_catalog', 'information_schema')
      AND n.nspname NOT LIKE 'pg_toast%%'
    ORDER BY 1, 2, 3
"""


def check_no_invalid_indexes(db: peewee.Database | Target) -> list[InvalidIndex]:
    """Return every invalid index of the database (empty when all are usable)."""
    # peewee's introspection has no indisvalid: this one needs the catalog
    with opened(db) as database:
        rows = database.execute_sql(_INVALID_INDEXES).fetchall()
    return [InvalidIndex(*row) for row in rows]


@dataclass(frozen=True)
class CheckReport:
    """The post-checks of one database: schema drift and invalid indexes."""

    drift: DriftReport
    invalid_indexes: tuple[InvalidIndex, ...] = ()

    @property
    def ok(self) -> bool:
        return self.drift.ok and not self.invalid_indexes

    def to_dict(self) -> dict:
        return {"ok": self.ok, "drift": self.drift.to_dict(),
                "invalid_indexes": [i.to_dict() for i in self.invalid_indexes]}

    def text(self) -> str:
        """Return the terminal rendering of both checks."""
        lines = [self.drift.text()]
        if self.invalid_indexes:
            lines.append(f"invalid indexes: {len(self.invalid_indexes)}")
            lines += [f"  {i.describe()}" for i in self.invalid_indexes]
        else:
            lines.append("no invalid indexes")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        """Return a markdown section for a Prefect artifact."""
        verdict = "passed" if self.ok else "**failed**"
        parts = [f"## Post-checks {verdict}", "", self.drift.to_markdown(), ""]
        if self.invalid_indexes:
            parts += ["### Invalid indexes", "", "| table | index | definition |", "|---|---|---|"]
            parts += [f"| {i.table} | {i.index} | `{i.definition}` |" for i in self.invalid_indexes]
        else:
            parts.append("### No invalid indexes")
        return "\n".join(parts)


NO_MODELS = ("no models to compare the schema with (MIGRATE_MODELS is not set): set it to the "
             "application's module:LIST to check the schema after every apply")


def run_post_checks(
    db_or_target: peewee.Database | Target,
    models: Iterable[type[peewee.Model]] | None,
    *,
    ignore_tables: Iterable[str] = DEFAULT_IGNORED_TABLES,
    before: DriftReport | None = None,
) -> CheckReport:
    """Return the post-checks of a database (one connection for all); raise DatabaseUnavailable.

    ``models`` None: the schema is not compared (a note says so). ``before``: the drift found
    before the apply; differences already there are notes, only what the batch changed fails.
    """
    with opened(db_or_target) as db:
        if models is None:
            drift = DriftReport((), notes=(NO_MODELS,))
        else:
            drift = schema_drift(db, models, ignore_tables=ignore_tables)
        invalid = check_no_invalid_indexes(db)
    if before is not None:
        drift = drift.since(before)
    return CheckReport(drift, tuple(invalid))


def drift_before(db_or_target: peewee.Database | Target,
                 models: Iterable[type[peewee.Model]] | None) -> DriftReport | None:
    """Return the drift of a database before an apply (None without models), to judge it against."""
    if models is None:
        return None
    with opened(db_or_target) as db:
        return schema_drift(db, models)


def load_models(spec: str | None) -> list[type[peewee.Model]] | None:
    """Return the models named by ``module:attribute`` (None when ``spec`` is empty); raise ConfigError."""
    if not spec:
        return None
    module_name, _, attr = spec.partition(":")
    try:
        models = getattr(importlib.import_module(module_name), attr or "MODELS")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load models {spec!r} ({exc}): "
                          "pass --models module:LIST or set MIGRATE_MODELS") from exc
    if not all(isinstance(m, type) and issubclass(m, peewee.Model) for m in models):
        raise ConfigError(f"{spec} is not a list of peewee models: pass --models module:LIST or set MIGRATE_MODELS")
    return list(models)
