"""Batched backfills: ``migrator.backfill(...)``, this product's own operation (pw_migrate has none).

``migrator.backfill(Model_or_table, set={"col": value_or_SQL}, where="col IS NULL",
batch_size=10_000, pause=0.1)`` or ``migrator.backfill(table, function=fill, ...)`` with a
module-level ``def fill(database, low, high)`` of the migration file (it updates the rows whose
primary key is in ``(low, high]``). In the batch's transaction it only records the work (a
:class:`~dbcore.migrate.safe_forms.Step` of phase 3); after the commit :func:`run_backfill` walks the
primary key in ranges of ``batch_size``, one short transaction per range, sleeping ``pause``
seconds between them, and writes how far it got in the same transaction as each range: a run
killed in the middle continues from the last committed range.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import peewee

from dbcore.errors import MigrationFileError
from dbcore.migrate.safe_forms import BACKFILL, Step, inline


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass
class Backfill:
    """What ``migrator.backfill(...)`` queued: turned into a phase-3 step when the queue is flushed."""

    table: str
    set: dict
    where: str | None
    function: Callable | None
    batch_size: int
    pause: float

    def __call__(self) -> None:  # pragma: no cover - run only through SafeForms
        raise MigrationFileError("migrator.backfill runs only under dbmigrate (pw_migrate has no phase 3)")

    def step(self, db: peewee.Database) -> Step:
        """Return the phase-3 step: the SQL of one range, and the plain form (one UPDATE of all rows)."""
        pk = primary_key(db, self.table)
        where = self.where if isinstance(self.where, str) or self.where is None else inline(
            db, *db.get_sql_context().sql(self.where).query())
        detail = {"pk": pk, "batch_size": int(self.batch_size), "pause": float(self.pause),
                  "where": where}
        t = _quote(self.table)
        if self.function is not None:
            if not getattr(self.function, "__name__", "").isidentifier():
                raise MigrationFileError("migrator.backfill(function=...) needs a module-level function "
                                         "of the migration file, def fill(database, low, high)")
            detail["function"] = self.function.__name__
            step = Step(BACKFILL, self.table, self.function.__name__, [], [], detail=detail)
            step.detail["_callable"] = self.function
            return step
        if not self.set:
            raise MigrationFileError("migrator.backfill needs set={column: value} or function=fill")
        parts = []
        for column, value in self.set.items():
            if isinstance(value, peewee.Node):
                sql, params = db.get_sql_context().sql(value).query()
                parts.append(f"{_quote(column)} = {inline(db, sql, tuple(params or ()))}")
            else:
                parts.append(inline(db, f"{_quote(column)} = %s", (value,)))
        update = f"UPDATE {t} SET {', '.join(parts)}"
        plain = update + (f" WHERE {where}" if where else "")
        return Step(BACKFILL, self.table, ", ".join(self.set), [update], [plain], detail=detail)


def primary_key(db: peewee.Database, table: str) -> str:
    """Return the table's single integer primary key column; refuse a table without one."""
    rows = db.execute_sql(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_index i "
        "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
        "WHERE i.indrelid = to_regclass(quote_ident(%s)) AND i.indisprimary", (table,)).fetchall()
    if len(rows) != 1 or rows[0][1] not in ("integer", "bigint", "smallint"):
        raise MigrationFileError(
            f"migrator.backfill on {table}: it walks the table by a single integer primary key, "
            f"and {table} has {', '.join(f'{n} {t}' for n, t in rows) or 'none'}: write the "
            "UPDATE with migrator.sql instead")
    return rows[0][0]


BackfillProgress = Callable[[str, int, int, int], None]  # (table, rows so far, key reached, last key)


def run_backfill(db: peewee.Database, step: Step, save: Callable[[dict], None],
                 function: Callable | None = None, progress: BackfillProgress | None = None) -> int:
    """Run ``step`` range by range from where it stopped; return the rows it changed in this run.

    ``save(detail)`` writes the progress; it is called inside each range's transaction.
    """
    d = step.detail
    pk = _quote(d["pk"])
    t = _quote(step.table)
    if "until" not in d:
        low, high = db.execute_sql(f"SELECT min({pk}), max({pk}) FROM {t}").fetchone()
        if low is None:
            d.update(until=0, done_up_to=0, rows=0)
            save(d)
            return 0
        # rows inserted after this point are written by the new application code already
        d.update(until=int(high), done_up_to=int(low) - 1, rows=d.get("rows", 0))
        save(d)
    changed = 0
    while d["done_up_to"] < d["until"]:
        low = d["done_up_to"]
        high = min(low + d["batch_size"], d["until"])
        with db.atomic():
            if function is not None:
                count = function(db, low, high)
                count = count if isinstance(count, int) else 0
            else:
                where = f" AND ({d['where']})" if d.get("where") else ""
                cursor = db.execute_sql(
                    f"{step.sql[0]} WHERE {pk} > {int(low)} AND {pk} <= {int(high)}{where}")
                count = cursor.rowcount
            d["done_up_to"], d["rows"] = high, d.get("rows", 0) + count
            save(d)
        changed += count
        if progress is not None:
            progress(step.table, d["rows"], high, d["until"])
        if d["done_up_to"] < d["until"] and d.get("pause"):
            time.sleep(d["pause"])
    return changed


class LargeUpdates:
    """A run observer (dbcore.migrate.observe) noting each UPDATE or DELETE of a batch phase that
    changed more than ``rows`` rows: on a rehearsal copy, the measure behind the lint's DS108.

    Such a statement holds a lock on every row it touched until the batch commits; the finding
    points to ``migrator.backfill``, which does the same in short transactions after the commit.
    """

    def __init__(self, rows: int) -> None:
        self.rows = rows
        #: (migration, statement number within it, rows changed, the statement's first 80 characters)
        self.found: list[tuple[str, int, int, str]] = []
        self._counts: dict[str, int] = {}

    # the RunObserver methods this one needs (the others are no-ops there)
    def phase_started(self, phase, db) -> None: ...

    def statement_started(self, statement) -> None:
        self._counts[statement.migration] = self._counts.get(statement.migration, 0) + 1

    def statement_done(self, statement, cursor, error) -> None:
        if error is not None or cursor is None or getattr(statement.phase, "kind", "batch") != "batch":
            return
        if statement.sql.lstrip()[:6].upper() in ("UPDATE", "DELETE") and (cursor.rowcount or 0) > self.rows:
            self.found.append((statement.migration, self._counts[statement.migration], cursor.rowcount,
                               " ".join(statement.sql.split())[:80]))

    def before_commit(self, phase, results, db) -> None: ...

    def phase_done(self, phase, results) -> None: ...
