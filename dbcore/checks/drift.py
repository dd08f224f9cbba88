"""Post-checks of a database after migrations: schema drift against the models, invalid indexes.

Every function here decides and returns data; the CLI prints it, the flow turns it into an
artifact and decides whether to roll back. The database is read, never written.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, cast

import peewee

from dbcore.connection import Target, connect

log = logging.getLogger(__name__)

#: tables the migration tooling owns; no application model describes them
DEFAULT_IGNORED_TABLES = frozenset({"migratehistory", "migration_audit"})

# peewee's PostgreSQL DDL names -> what format_type() (and so get_columns) reports
_PG_TYPE_NAMES = {
    "SERIAL": "integer", "BIGSERIAL": "bigint", "SMALLSERIAL": "smallint",
    "INT": "integer", "INTEGER": "integer", "BIGINT": "bigint", "SMALLINT": "smallint",
    "VARCHAR": "character varying", "CHAR": "character", "TEXT": "text",
    "TIMESTAMP": "timestamp without time zone", "TIMESTAMPTZ": "timestamp with time zone",
    "TIME": "time without time zone", "DATE": "date", "INTERVAL": "interval",
    "BOOLEAN": "boolean", "BOOL": "boolean", "REAL": "real", "DOUBLE PRECISION": "double precision",
    "NUMERIC": "numeric", "DECIMAL": "numeric", "BYTEA": "bytea", "UUID": "uuid",
    "JSON": "json", "JSONB": "jsonb",
}
_DDL_TYPE = re.compile(r"^\s*([A-Za-z][A-Za-z ]*?)\s*(\([^)]*\))?\s*((?:\[\d*\])*)\s*$")
_RAW_INDEX_NAME = re.compile(r'\bINDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+NOT\s+EXISTS\s+)?"?([\w$]+)"?',
                             re.IGNORECASE)


def pg_type_name(ddl_type: str) -> str:
    """Return the type as PostgreSQL's format_type() spells it ("VARCHAR(200)" -> "character varying(200)")."""
    match = _DDL_TYPE.match(ddl_type)
    if not match:
        return ddl_type.lower()
    base, modifier, array = match.groups()
    name = _PG_TYPE_NAMES.get(base.upper(), base.lower())
    modifier = re.sub(r"\s+", "", modifier or "")
    if name.endswith(" time zone") and modifier:  # timestamp(3) with time zone
        head, _, tail = name.partition(" ")
        name, modifier = f"{head}{modifier} {tail}", ""
    return name + modifier + ("[]" if array else "")


@dataclass(frozen=True)
class Difference:
    """One way the database differs from the models; ``expected`` is the models' side."""

    kind: str
    table: str
    column: str | None = None
    index: str | None = None
    expected: str | None = None
    actual: str | None = None

    def describe(self) -> str:
        """Return one sentence saying what differs."""
        where = f"{self.table}.{self.column}" if self.column else self.table
        return {
            "missing_table": f"table {self.table} is missing",
            "extra_table": f"table {self.table} exists but no model describes it",
            "missing_column": f"column {where} ({self.expected}) is missing",
            "extra_column": f"column {where} ({self.actual}) exists but the model has no such field",
            "type_mismatch": f"column {where} is {self.actual}, the model says {self.expected}",
            "nullability_mismatch": f"column {where} is {self.actual}, the model says {self.expected}",
            "primary_key_mismatch": f"primary key of {self.table} is ({self.actual}), "
                                    f"the model says ({self.expected})",
            "missing_index": f"index {self.expected} on {self.table} is missing",
            "extra_index": f"index {self.index} {self.actual} on {self.table} is not in the model",
            "index_mismatch": f"index {self.index} on {self.table} is {self.actual}, "
                              f"the model says {self.expected}",
        }.get(self.kind, f"{self.kind} on {where}: expected {self.expected}, found {self.actual}")

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.describe()}


@dataclass(frozen=True)
class DriftReport:
    """The differences between the models and the database (empty: no drift)."""

    differences: tuple[Difference, ...]
    tables: tuple[str, ...] = ()
    #: what was deliberately not compared (e.g. expression indexes), for a reader to check by hand
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.differences

    def since(self, before: DriftReport) -> DriftReport:
        """Return this report with the differences ``before`` already had turned into notes.

        Real applications' models rarely describe every table: what existed before an apply is
        for a reader to know, not for the apply to fail on.
        """
        old = set(before.differences)
        kept = tuple(d for d in self.differences if d not in old)
        notes = tuple(f"already before the apply: {d.describe()}" for d in self.differences
                      if d in old)
        return DriftReport(kept, self.tables, self.notes + notes)

    def to_dict(self) -> dict:
        return {"ok": self.ok, "tables": list(self.tables),
                "differences": [d.to_dict() for d in self.differences], "notes": list(self.notes)}

    def text(self) -> str:
        """Return the terminal rendering: one line per difference, or that there is none."""
        if self.ok and not self.tables and self.notes:
            lines = ["schema not compared"]
        elif self.ok:
            lines = [f"schema matches the models ({len(self.tables)} tables)"]
        else:
            lines = [f"schema drift: {len(self.differences)} difference(s) between the models and "
                     "the database"] + [f"  {d.kind}: {d.describe()}" for d in self.differences]
        return "\n".join(lines + [f"  note: {note}" for note in self.notes])

    def to_markdown(self) -> str:
        """Return a markdown section (a verdict and a table) for a Prefect artifact."""
        if self.ok and not self.tables and self.notes:
            lines = ["### Schema not compared"]
        elif self.ok:
            lines = [f"### Schema matches the models\n\n{len(self.tables)} tables compared."]
        else:
            lines = [f"### Schema drift: {len(self.differences)} difference(s)", "",
                     "| kind | table | column / index | models | database |", "|---|---|---|---|---|"]
        for d in self.differences:
            cells = [d.kind, d.table, d.column or d.index or "", d.expected or "", d.actual or ""]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
        if self.notes:
            lines += ["", "Notes (not failures; check by hand):", ""] + [f"- {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass(frozen=True)
class _Index:
    name: str
    columns: tuple[str, ...]
    unique: bool
    method: str
    predicate: str | None = None  # a partial index's WHERE, as pg_get_expr() prints it
    expressions: bool = False  # indexes an expression: ``columns`` is then incomplete

    @property
    def key(self) -> tuple:
        return (self.columns, self.unique, self.method, self.predicate)

    def label(self) -> str:
        kind = "UNIQUE " if self.unique else ""
        using = "" if self.method == "btree" else f" USING {self.method}"
        where = f" WHERE {self.predicate}" if self.predicate else ""
        what = "(expressions)" if self.expressions else f"({', '.join(self.columns)})"
        return f"{kind}{what}{using}{where}"


@contextmanager
def opened(db_or_target: peewee.Database | Target) -> Iterator[peewee.Database]:
    """Yield a connected database; close only what was opened here."""
    if isinstance(db_or_target, Target):
        db = connect(db_or_target, application_name="dbmigrate-check")
        try:
            yield db
        finally:
            db.close()
    elif db_or_target.is_closed():
        with db_or_target.connection_context():
            yield db_or_target
    else:
        yield db_or_target


def _ddl_type(db: peewee.Database, field: peewee.Field) -> str:
    node = field.ddl_datatype(db.get_sql_context())
    return db.get_sql_context().sql(node).query()[0] if node is not None else ""


def _expected_indexes(model: type[peewee.Model], notes: list[str]) -> tuple[list[_Index], set[str]]:
    """Return the model's indexes the check can compare, and the names of those it cannot.

    An index on an expression, a partial index or one written as raw SQL has no reliable
    counterpart in the catalog's spelling: it is listed in ``notes``, never reported as drift.
    """
    table = model._meta.table_name
    indexes, skipped = [], set()
    for index in model._meta.fields_to_index():
        if not isinstance(index, peewee.Index):
            match = _RAW_INDEX_NAME.search(getattr(index, "sql", ""))
            name = match.group(1) if match else "(raw SQL)"
            notes.append(f"index {name} on {table} is defined as raw SQL in the model")
            skipped.add(name)
            continue
        index = cast(Any, index)  # peewee keeps what an Index was given in private attributes
        why = ("has a WHERE clause (partial index)" if index._where is not None else
               "indexes an expression" if not all(isinstance(e, peewee.Field) for e in index._expressions)
               else None)
        if why:
            notes.append(f"index {index._name} on {table} {why}")
            skipped.add(index._name)
            continue
        indexes.append(_Index(index._name, tuple(e.column_name for e in index._expressions),
                              bool(index._unique), (index._using or "btree").lower()))
    return indexes, skipped


# every index of a table but the primary key's, with its key columns (INCLUDE columns aside)
_TABLE_INDEXES = """
    SELECT i.relname, x.indisunique, am.amname, pg_get_expr(x.indpred, x.indrelid),
           x.indexprs IS NOT NULL,
           ARRAY(SELECT a.attname::text
                 FROM unnest((x.indkey::int2[])[0:x.indnkeyatts - 1]) WITH ORDINALITY AS k(attnum, ord)
                 JOIN pg_attribute AS a ON a.attrelid = x.indrelid AND a.attnum = k.attnum
                 ORDER BY k.ord)
    FROM pg_index AS x
    JOIN pg_class AS i ON i.oid = x.indexrelid
    JOIN pg_class AS t ON t.oid = x.indrelid
    JOIN pg_namespace AS n ON n.oid = t.relnamespace
    JOIN pg_am AS am ON am.oid = i.relam
    WHERE t.relname = %s AND n.nspname = COALESCE(%s, current_schema()) AND NOT x.indisprimary
    ORDER BY i.relname
"""


def _actual_indexes(db: peewee.Database, table: str, schema: str | None) -> list[_Index]:
    # peewee's get_indexes loses expressions and WHERE clauses: this needs the catalog
    rows = db.execute_sql(_TABLE_INDEXES, (table, schema)).fetchall()
    return [_Index(name, tuple(columns), bool(unique), method, predicate, bool(expressions))
            for name, unique, method, predicate, expressions, columns in rows]


def _index_drift(table: str, expected: list[_Index], skipped: set[str], actual: list[_Index],
                 notes: list[str]) -> Iterator[Difference]:
    """Yield the index differences: exact matches first, then same columns, then what is left."""
    have = list(actual)
    unmatched = []
    for want in expected:
        index = next((i for i in have if i.key == want.key and not i.expressions), None)
        if index is None:
            unmatched.append(want)
        else:
            have.remove(index)
    for want in unmatched:
        index = next((i for i in have if i.columns == want.columns and not i.expressions), None)
        if index is None:
            yield Difference("missing_index", table, index=want.name, expected=want.label())
        else:
            have.remove(index)
            yield Difference("index_mismatch", table, index=index.name, expected=want.label(),
                             actual=index.label())
    for index in have:
        if index.name in skipped:
            continue  # the model's own uncomparable index: already in the notes
        if skipped and (index.expressions or index.predicate):
            notes.append(f"index {index.name} {index.label()} on {table} may be one of the "
                         "model's indexes above")
            continue
        yield Difference("extra_index", table, index=index.name, actual=index.label())


def _model_drift(db: peewee.Database, model: type[peewee.Model],
                 notes: list[str]) -> Iterator[Difference]:
    meta = model._meta
    table, schema = meta.table_name, meta.schema
    actual = {c.name: c for c in db.get_columns(table, schema)}
    expected = {f.column_name: f for f in meta.sorted_fields}
    for name, field in expected.items():
        want_type = pg_type_name(_ddl_type(db, field))
        want_null = "NULL" if field.null and not field.primary_key else "NOT NULL"
        column = actual.get(name)
        if column is None:
            yield Difference("missing_column", table, name, expected=f"{want_type} {want_null}")
            continue
        if column.full_type != want_type:
            yield Difference("type_mismatch", table, name, expected=want_type, actual=column.full_type)
        have_null = "NULL" if column.null else "NOT NULL"
        if have_null != want_null:
            yield Difference("nullability_mismatch", table, name, expected=want_null, actual=have_null)
    for name, column in actual.items():
        if name not in expected:
            yield Difference("extra_column", table, name,
                             actual=f"{column.full_type} {'NULL' if column.null else 'NOT NULL'}")

    pk = meta.primary_key
    want_pk = [] if pk is False or pk is None else \
        [meta.fields[n].column_name for n in pk.field_names] if isinstance(pk, peewee.CompositeKey) \
        else [pk.column_name]
    have_pk = db.get_primary_keys(table, schema)
    if list(have_pk) != want_pk:
        yield Difference("primary_key_mismatch", table, expected=", ".join(want_pk),
                         actual=", ".join(have_pk))

    indexes, skipped = _expected_indexes(model, notes)
    yield from _index_drift(table, indexes, skipped, _actual_indexes(db, table, schema), notes)


def schema_drift(
    db_or_target: peewee.Database | Target,
    models: Iterable[type[peewee.Model]],
    *,
    ignore_tables: Iterable[str] = DEFAULT_IGNORED_TABLES,
) -> DriftReport:
    """Return how the live schema differs from ``models``; raise DatabaseUnavailable if unreachable."""
    models = list(models)
    ignored = set(ignore_tables)
    differences: list[Difference] = []
    notes: list[str] = []
    with opened(db_or_target) as db:
        schemas = {m._meta.schema for m in models} or {None}
        present = {(s, t) for s in schemas for t in db.get_tables(s)}
        modelled = {(m._meta.schema, m._meta.table_name) for m in models}
        for model in models:
            if (model._meta.schema, model._meta.table_name) not in present:
                differences.append(Difference("missing_table", model._meta.table_name))
            else:
                differences += _model_drift(db, model, notes)
        for _schema, table in sorted(present - modelled, key=lambda p: (p[0] or "", p[1])):
            if table not in ignored:
                differences.append(Difference("extra_table", table))
    log.debug("schema drift: %d difference(s) over %d model(s)", len(differences), len(models))
    return DriftReport(tuple(differences), tuple(sorted(t for _, t in modelled)), tuple(notes))


