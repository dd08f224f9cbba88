"""The queries to propose indexes for: pg_stat_statements on the target, a file of SQL, or the app's code.

pg_stat_statements is read on the target (read-only): its normalised texts carry ``$n`` in place
of every constant, so no production value leaves the database. A file (``--queries FILE``: a
slow-query log, statements separated by ``;``) and the app's Peewee code (``--app PATH`` with
``MIGRATE_MODELS``) have no timings: their queries weigh the same.
"""

from __future__ import annotations

import ast as pyast
import logging
from dataclasses import dataclass
from pathlib import Path

import peewee
import pglast
import psycopg2
from pglast.parser import ParseError

from dbcore.connection import Target, raw_session
from dbcore.errors import ConfigError
from dbcore.redact import error_line

log = logging.getLogger(__name__)

#: the most expensive statements read from pg_stat_statements
TOP_STATEMENTS = 200
_KINDS = ("select", "with", "update", "delete")


@dataclass(frozen=True)
class Query:
    """One statement of the workload, with its weight when known."""

    sql: str
    source: str  # "pg_stat_statements", the file's name, or "app: path:line"
    calls: int = 0
    total_ms: float | None = None  # None: no timing (a file, the app's code)
    mean_ms: float | None = None

    def short(self, width: int = 90) -> str:
        text = " ".join(self.sql.split())
        return text if len(text) <= width else text[: width - 3] + "..."


@dataclass(frozen=True)
class Workload:
    """The queries, and the whole time pg_stat_statements recorded for the database (for shares)."""

    queries: tuple[Query, ...]
    total_ms: float = 0.0  # every statement of the database, not only these: the share's base
    notes: tuple[str, ...] = ()

    def share(self, query: Query) -> float | None:
        """Return the query's share of the database's recorded time (None without timings)."""
        if query.total_ms is None or not self.total_ms:
            return None
        return query.total_ms / self.total_ms

    def weight(self, query: Query) -> float:
        """Return the weight of ``query`` in the choice (its share, else an equal part)."""
        share = self.share(query)
        return share if share is not None else 1.0 / max(len(self.queries), 1)


def _worth_reading(sql: str) -> bool:
    text = sql.lstrip().lower()
    if not text.startswith(_KINDS):
        return False
    if any(word in text for word in ("pg_catalog", "pg_stat", "information_schema", "migratehistory",
                                     "migration_audit", "hypopg")):
        return False
    try:
        return len(pglast.parse_sql(sql)) == 1  # one statement: it is only ever EXPLAINed, alone
    except ParseError:
        return False


_STATEMENTS = """
    SELECT query, calls, total_exec_time, mean_exec_time
    FROM pg_stat_statements AS s
    WHERE s.dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
    ORDER BY total_exec_time DESC
"""


def from_pg_stat_statements(target: Target) -> Workload | None:
    """Return the statements pg_stat_statements recorded for the target's database.

    None when the extension is not installed in that database (or not loaded by the server):
    the caller says how to get it, or uses another source.
    """
    with raw_session(target, "dbmigrate suggest-indexes") as conn, conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
        cur.execute("SELECT 1 FROM pg_extension WHERE extname = 'pg_stat_statements'")
        if cur.fetchone() is None:
            return None
        try:
            cur.execute(_STATEMENTS)
        except psycopg2.Error as exc:  # installed but not in shared_preload_libraries
            log.info("pg_stat_statements cannot be read: %s", error_line(exc, target.password))
            return None
        rows = cur.fetchall()
    total = sum(float(r[2]) for r in rows)
    queries = [Query(sql, "pg_stat_statements", int(calls), float(total_ms), float(mean_ms))
               for sql, calls, total_ms, mean_ms in rows if sql and _worth_reading(sql)]
    return Workload(tuple(queries[:TOP_STATEMENTS]), total)


def from_file(path: Path) -> Workload:
    """Return the statements of a SQL file (separated by ``;``); raise ConfigError."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read --queries {path}: {exc.strerror}: give a file of SQL "
                          "statements separated by ;") from None
    try:
        statements = pglast.split(text)
    except ParseError as exc:
        raise ConfigError(f"--queries {path} is not SQL PostgreSQL can parse ({exc}): fix the "
                          "statement or remove it") from None
    queries = [Query(s.strip(), Path(path).name, 1) for s in statements if _worth_reading(s)]
    skipped = len(statements) - len(queries)
    notes = (f"{skipped} statement(s) of {Path(path).name} are not SELECT/UPDATE/DELETE on the "
             "app's tables: skipped",) if skipped else ()
    return Workload(tuple(queries), 0.0, notes)


# -- the app's own code: a static reading of Peewee queries

_COMPARE = {pyast.Eq: "=", pyast.Lt: "<", pyast.Gt: ">", pyast.LtE: "<=", pyast.GtE: ">="}


class _PeeweeReader(pyast.NodeVisitor):
    """Finds ``Model.field`` in ``.where()``, ``.order_by()`` and ``.join(on=...)`` calls."""

    def __init__(self, fields: dict[tuple[str, str], tuple[str, str]], where: str):
        self.fields, self.where = fields, where  # (Class, attr) -> (table, column)
        self.found: list[tuple[str, int]] = []  # (SQL, line)

    def _field(self, node) -> tuple[str, str] | None:
        if (isinstance(node, pyast.Attribute) and isinstance(node.value, pyast.Name)):
            return self.fields.get((node.value.id, node.attr))
        return None

    def _conditions(self, node, equal: list, ranged: list) -> None:
        if isinstance(node, pyast.BinOp) and isinstance(node.op, pyast.BitAnd):
            self._conditions(node.left, equal, ranged)
            self._conditions(node.right, equal, ranged)
        elif isinstance(node, pyast.Compare) and len(node.ops) == 1:
            op = _COMPARE.get(type(node.ops[0]))
            col = self._field(node.left) or self._field(node.comparators[0])
            if col and op and not (self._field(node.left) and self._field(node.comparators[0])):
                (equal if op == "=" else ranged).append(col)
        elif (isinstance(node, pyast.Call) and isinstance(node.func, pyast.Attribute)
              and node.func.attr in ("in_", "is_null")):
            col = self._field(node.func.value)
            if col:
                equal.append(col)

    def visit_Call(self, node: pyast.Call) -> None:
        self.generic_visit(node)
        if not isinstance(node.func, pyast.Attribute):
            return
        kind = node.func.attr
        if kind == "where":
            equal: list = []
            ranged: list = []
            for arg in node.args:
                self._conditions(arg, equal, ranged)
            for table in {t for t, _ in equal + ranged}:
                conds = [f"{c} = $1" for t, c in equal if t == table]
                conds += [f"{c} > $1" for t, c in ranged if t == table]
                self._add(f"SELECT * FROM {table} WHERE {' AND '.join(conds)}", node.lineno)
        elif kind == "order_by":
            found = [self._field(a.func.value if isinstance(a, pyast.Call)
                                 and isinstance(a.func, pyast.Attribute) else a) for a in node.args]
            cols = [c for c in found if c is not None]
            if cols and len({t for t, _ in cols}) == 1:
                table = cols[0][0]
                self._add(f"SELECT * FROM {table} ORDER BY {', '.join(c for _, c in cols)} LIMIT 20",
                          node.lineno)
        elif kind == "join":
            on = next((k.value for k in node.keywords if k.arg == "on"), None)
            if isinstance(on, pyast.Compare) and len(on.ops) == 1 and isinstance(on.ops[0], pyast.Eq):
                left, right = self._field(on.left), self._field(on.comparators[0])
                if left and right and left[0] != right[0]:
                    for table, col in (left, right):
                        self._add(f"SELECT * FROM {table} WHERE {col} = $1", node.lineno)

    def _add(self, sql: str, line: int) -> None:
        self.found.append((sql, line))


def _field_map(models: list[type[peewee.Model]]) -> dict[tuple[str, str], tuple[str, str]]:
    fields = {}
    for model in models:
        for name, fld in model._meta.fields.items():
            fields[(model.__name__, name)] = (model._meta.table_name, fld.column_name)
    return fields


def from_app(path: Path, models: list[type[peewee.Model]]) -> Workload:
    """Return the queries a static reading of the Peewee code under ``path`` finds, and one lookup
    per foreign key (an unindexed one makes every delete of the parent scan the child)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--app {path} does not exist: give the app's source folder")
    fields = _field_map(models)
    queries: list[Query] = []
    seen: set[str] = set()

    def add(sql: str, source: str) -> None:
        if sql not in seen:
            seen.add(sql)
            queries.append(Query(sql, source, 1))

    for model in models:
        for fld in model._meta.sorted_fields:
            if isinstance(fld, peewee.ForeignKeyField):
                add(f"SELECT * FROM {model._meta.table_name} WHERE {fld.column_name} = $1",
                    f"app: foreign key {model.__name__}.{fld.name}")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*.py")
                                                   if ".venv" not in p.parts)
    for file in files:
        try:
            tree = pyast.parse(file.read_text(), str(file))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue
        reader = _PeeweeReader(fields, str(file))
        reader.visit(tree)
        for sql, line in reader.found:
            add(sql, f"app: {file.relative_to(path) if path.is_dir() else file.name}:{line}")
    return Workload(tuple(queries))


def merged(*workloads: Workload | None) -> Workload:
    """Return one workload of several (the first timed one gives the base of the shares)."""
    present = [w for w in workloads if w is not None]
    queries, seen = [], set()
    for w in present:
        for q in w.queries:
            key = " ".join(q.sql.split()).lower()
            if key not in seen:
                seen.add(key)
                queries.append(q)
    total = next((w.total_ms for w in present if w.total_ms), 0.0)
    return Workload(tuple(queries), total, tuple(n for w in present for n in w.notes))
