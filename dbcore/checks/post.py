"""Post-checks of a database after migrations: drift against the models, invalid indexes, and
the team's own data checks (dbcore/checks/data.py) when given.

Every function here decides and returns data; the CLI prints it, the flow turns it into an
artifact and decides whether to roll back. The database is read, never written.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable
from dataclasses import asdict, dataclass

import peewee

from dbcore.checks.data import DataCheckReport, DataChecks
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
    """The post-checks of one database: schema drift, invalid indexes, the team's data checks."""

    drift: DriftReport
    invalid_indexes: tuple[InvalidIndex, ...] = ()
    data: DataCheckReport | None = None

    @property
    def ok(self) -> bool:
        return self.drift.ok and not self.invalid_indexes and (self.data is None or self.data.ok)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "drift": self.drift.to_dict(),
                "invalid_indexes": [i.to_dict() for i in self.invalid_indexes],
                "data": self.data.to_dict() if self.data else None}

    def first_problem(self) -> str | None:
        """Return one line naming the first thing that failed (None when all passed)."""
        if self.data is not None and self.data.failures:
            return self.data.failures[0]
        if self.invalid_indexes:
            return self.invalid_indexes[0].describe()
        if not self.drift.ok:
            return "the schema differs from the models"
        return None

    def text(self) -> str:
        """Return the terminal rendering of both checks."""
        lines = [self.drift.text()]
        if self.invalid_indexes:
            lines.append(f"invalid indexes: {len(self.invalid_indexes)}")
            lines += [f"  {i.describe()}" for i in self.invalid_indexes]
        else:
            lines.append("no invalid indexes")
        if self.data is not None:
            lines.append(self.data.text())
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
        if self.data is not None:
            parts += ["", self.data.to_markdown()]
        return "\n".join(parts)


NO_MODELS = ("no models to compare the schema with (MIGRATE_MODELS is not set): set it to the "
             "application's module:LIST to check the schema after every apply")


def run_post_checks(
    db_or_target: peewee.Database | Target,
    models: Iterable[type[peewee.Model]] | None,
    *,
    ignore_tables: Iterable[str] = DEFAULT_IGNORED_TABLES,
    before: DriftReport | None = None,
    data: DataChecks | None = None,
) -> CheckReport:
    """Return the post-checks of a database (one connection for all); raise DatabaseUnavailable.

    ``models`` None: the schema is not compared (a note says so). ``before``: the drift found
    before the apply; differences already there are notes, only what the batch changed fails.
    ``data``: the team's data checks to run too (a Target is needed for them).
    """
    with opened(db_or_target) as db:
        if models is None:
            drift = DriftReport((), notes=(NO_MODELS,))
        else:
            drift = schema_drift(db, models, ignore_tables=ignore_tables)
        invalid = check_no_invalid_indexes(db)
    if before is not None:
        drift = drift.since(before)
    report = None
    if data is not None and not data.empty and isinstance(db_or_target, Target):
        report = data.run(db_or_target)
    return CheckReport(drift, tuple(invalid), report)


def drift_before(db_or_target: peewee.Database | Target,
                 models: Iterable[type[peewee.Model]] | None) -> DriftReport | None:
    """Return the drift of a database before an apply (None without models), to judge it against."""
    if models is None:
        return None
    with opened(db_or_target) as db:
        return schema_drift(db, models)


#: the forms MIGRATE_MODELS accepts, for every error about it
MODELS_FORMS = ("give module:NAME (NAME a list or tuple of peewee models, or a function returning "
                "one) or a bare module (the models defined in it that have a table)")


def load_models(spec: str | None) -> list[type[peewee.Model]] | None:
    """Return the models named by MIGRATE_MODELS (None when ``spec`` is empty); raise ConfigError.

    ``module:NAME``: NAME is a list or tuple of models, or a callable returning one. A bare
    ``module``: the Model subclasses defined in it that have a table (imported ones and bases
    other models of the module derive from are not).
    """
    if not spec:
        return None
    module_name, colon, attr = spec.strip().partition(":")
    if not module_name or (colon and not attr):
        raise ConfigError(f"MIGRATE_MODELS={spec!r} is not a model reference: {MODELS_FORMS}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - the app's own import error, named in one line
        raise ConfigError(f"MIGRATE_MODELS={spec!r}: cannot import {module_name} "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}): "
                          "install the application's dependencies in this environment and put its "
                          "folder on PYTHONPATH (docs/adoption.md)") from None
    if not colon:
        return _models_defined_in(module, spec)
    if not hasattr(module, attr):
        raise ConfigError(f"MIGRATE_MODELS={spec!r}: {module_name} has no {attr}: {MODELS_FORMS}")
    models = getattr(module, attr)
    if callable(models) and not isinstance(models, type):
        try:
            models = models()
        except Exception as exc:  # noqa: BLE001 - the app's function failed: one line, named
            raise ConfigError(f"MIGRATE_MODELS={spec!r}: {attr}() raised {type(exc).__name__}: "
                              f"{exc}: {MODELS_FORMS}") from None
    if not isinstance(models, (list, tuple)) or not all(
            isinstance(m, type) and issubclass(m, peewee.Model) for m in models):
        raise ConfigError(f"MIGRATE_MODELS={spec!r} is a {type(models).__name__}, not a list of "
                          f"peewee models: {MODELS_FORMS}")
    return list(models)


def _models_defined_in(module, spec: str) -> list[type[peewee.Model]]:
    """Return the Model subclasses ``module`` defines, less the bases its other models derive from."""
    defined = [m for m in vars(module).values() if isinstance(m, type) and issubclass(m, peewee.Model)
               and m.__module__ == module.__name__]
    bases = {b for m in defined for b in m.__mro__[1:]}
    models = [m for m in defined if m not in bases]
    if not models:
        raise ConfigError(f"MIGRATE_MODELS={spec!r}: {module.__name__} defines no peewee model "
                          f"with a table: {MODELS_FORMS}")
    return models
