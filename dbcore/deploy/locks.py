"""Measure what each statement of a rehearsal does to the tables: locks, rewrites, rows, time.

A :class:`LockMeter` watches one connection (the rehearsal's) statement by statement. Between
statements it reads, on that same connection and so inside the same transaction, the relation
locks its own backend holds (``pg_locks``), the relfilenode of every table and index (a changed
one means the statement rewrote it), the tuples each table's scans returned (a scan to validate)
and, after the statement, the rows it changed and its duration. A statement run outside a
transaction (``atomic = False``: CREATE INDEX CONCURRENTLY) releases its locks before it ends, so
a second connection samples that backend's locks while it runs.

Its own queries go through the raw psycopg2 cursor, never through ``execute_sql``: they never
enter the captured SQL, its lint or the plan's fingerprint. ``dbcore.deploy.verdict`` turns the
:class:`LockReport` into what the approver reads.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import pglast
from pglast import ast
from psycopg2 import extensions

from dbcore.connection import Target, connect_raw
from dbcore.errors import DatabaseUnavailable
from dbcore.migrate.history import AUDIT_TABLE, HISTORY_TABLE
from dbcore.migrate.observe import RunObserver, Statement
from dbcore.migrate.plan import Phase, Plan, RunReport
from dbcore.migrate.runner import execute
from dbcore.settings import Settings

log = logging.getLogger(__name__)

#: first object id of user objects: lower ones are the system catalogs the measuring reads
_FIRST_USER_OID = 16384
#: the bookkeeping tables are the tool's own, never the application's
_OWN_TABLES = {HISTORY_TABLE, AUDIT_TABLE}
_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s")
#: how often the second connection looks at the locks of a statement outside a transaction
SAMPLE_INTERVAL = 0.02

#: lock modes from weakest to strongest, and what each blocks of the application's queries
LOCK_MODES = ("AccessShareLock", "RowShareLock", "RowExclusiveLock", "ShareUpdateExclusiveLock",
              "ShareLock", "ShareRowExclusiveLock", "ExclusiveLock", "AccessExclusiveLock")
#: what a lock mode blocks in the application's terms: SELECT/INSERT/UPDATE/DELETE take ACCESS
#: SHARE and ROW EXCLUSIVE, so only these modes conflict with them
BLOCKS = {"AccessExclusiveLock": "reads and writes", "ExclusiveLock": "writes",
          "ShareRowExclusiveLock": "writes", "ShareLock": "writes"}

_RELATIONS = """
SELECT c.oid, c.relfilenode, c.relkind, n.nspname, c.relname, coalesce(i.indrelid, 0),
       CASE WHEN c.relkind IN ('r', 'm') THEN pg_stat_get_xact_tuples_returned(c.oid) ELSE 0 END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
LEFT JOIN pg_index i ON i.indexrelid = c.oid
WHERE c.relkind IN ('r', 'p', 'm', 'i', 'I')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')
  AND n.nspname NOT LIKE 'pg\\_temp\\_%%' AND n.nspname NOT LIKE 'pg\\_toast\\_temp\\_%%'
"""
_LOCKS = ("SELECT relation, mode FROM pg_locks WHERE pid = %s AND locktype = 'relation' "
          "AND granted AND relation >= %s")
_SIZES = ("SELECT c.oid, pg_table_size(c.oid), greatest(c.reltuples, pg_stat_get_live_tuples(c.oid))"
          " FROM pg_class c WHERE c.oid = ANY(%s)")


def strength(mode: str) -> int:
    """Return the rank of a lock mode (0 for ACCESS SHARE, 7 for ACCESS EXCLUSIVE)."""
    return LOCK_MODES.index(mode) if mode in LOCK_MODES else -1


def mode_name(mode: str) -> str:
    """Return a lock mode as PostgreSQL's documentation writes it: ``AccessExclusiveLock`` -> ACCESS EXCLUSIVE."""
    words, word = [], ""
    for ch in mode.removesuffix("Lock"):
        if ch.isupper() and word:
            words.append(word)
            word = ""
        word += ch
    return " ".join(words + [word]).upper()


@dataclass(frozen=True)
class _Relation:
    oid: int
    filenode: int
    kind: str  # pg_class.relkind
    name: str  # schema-qualified unless in public
    table_oid: int  # for an index, its table; else its own oid
    scanned: int  # tuples returned by scans of it in this transaction (tables)


@dataclass(frozen=True)
class StatementMeasure:
    """One statement as the rehearsal ran it: when, how long, the locks it added and what it did.

    ``locks`` maps each application table to the strongest mode this statement added on it (an
    index's lock counts for its table); ``rewritten`` names the tables whose file, or one of
    whose indexes' files, changed; ``scanned`` the tables it read whole (tuples returned);
    ``indexed`` the tables it built an index on; ``rows`` the rows an UPDATE or DELETE changed
    (row locks held to the commit); ``phase`` counts the batch's transactions from 1 (a
    statement outside any transaction has a phase of its own).
    """

    migration: str
    number: int  # 1-based, among the statements the migration sent
    sql: str
    phase: int
    started: float  # seconds since the measuring began, the meter's own queries left out
    seconds: float
    locks: dict[str, str] = field(default_factory=dict)
    rewritten: tuple[str, ...] = ()
    scanned: dict[str, int] = field(default_factory=dict)
    indexed: tuple[str, ...] = ()
    rows: dict[str, int] = field(default_factory=dict)
    in_transaction: bool = True
    sampled: bool = False  # the locks were seen by the second connection while it ran
    line: int | None = None  # the line of the migrator call that queued it, where the runner knows


@dataclass(frozen=True)
class TableSize:
    """A locked table as the copy had it: bytes (with TOAST, without indexes) and estimated rows."""

    bytes: int
    rows: int


@dataclass(frozen=True)
class LockReport:
    """Everything the meter saw: the statements, each phase's end, the tables' sizes, the server."""

    statements: tuple[StatementMeasure, ...]
    phase_ends: dict[int, float]  # phase -> seconds since the start, when it committed
    sizes: dict[str, TableSize]
    server_major: int
    new_tables: tuple[str, ...] = ()  # created by the batch: no application query uses them yet

    def to_dict(self) -> dict:
        return {"statements": [asdict(s) for s in self.statements],
                "phase_ends": {str(k): v for k, v in self.phase_ends.items()},
                "sizes": {k: asdict(v) for k, v in self.sizes.items()},
                "server_major": self.server_major, "new_tables": list(self.new_tables)}


class _Sampler:
    """Reads another backend's relation locks from a connection of its own, while a statement runs."""

    def __init__(self, target: Target, pid: int) -> None:
        self.conn = connect_raw(target, "dbmigrate-lock-sampler")
        self.conn.autocommit = True
        self.pid = pid
        self.seen: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lock-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self.conn.cursor() as cur:
            while True:
                stop = self._stop.is_set()  # one more look after the statement ended
                cur.execute(_LOCKS, (self.pid, _FIRST_USER_OID))
                for oid, mode in cur.fetchall():
                    if strength(mode) > strength(self.seen.get(oid, "")):
                        self.seen[oid] = mode
                if stop:
                    return
                self._stop.wait(SAMPLE_INTERVAL)

    def stop(self) -> dict[int, str]:
        self._stop.set()
        self._thread.join()
        self.conn.close()
        return self.seen


class LockMeter(RunObserver):
    """Measures every statement a run's migrations send; ``report()`` returns what it saw.

    A :class:`~dbcore.migrate.observe.RunObserver`: pass it to the runner's ``execute``. It can
    also be driven by hand (:meth:`attach`, then :meth:`before` and :meth:`after` around each
    statement and :meth:`transaction_ended` after each COMMIT). ``target`` is where the second
    connection goes (the same database).
    """

    def __init__(self, target: Target) -> None:
        self.target = target
        self.statements: list[StatementMeasure] = []
        self.phase_ends: dict[int, float] = {}
        self._conn: Any = None  # the psycopg2 connection measured on
        self._pid = 0
        self._major = 0
        self._t0 = time.monotonic()
        self._spent = 0.0  # seconds of the meter's own queries: left out of every window
        self._phase = 0
        self._phase_open = False
        self._known: set[int] | None = None  # the relations before the first statement
        self._counts: dict[str, int] = {}
        self._pending: tuple | None = None
        self._line: int | None = None
        self._sizes: dict[str, int] = {}  # the tables locked: name -> oid
        self.sizes: dict[str, TableSize] = {}

    # -- the runner's seam
    def phase_started(self, phase: Phase, db) -> None:
        if self._conn is None:
            self.attach(db)

    def statement_started(self, statement: Statement) -> None:
        self.before(statement.sql, statement.migration, statement.line)

    def statement_done(self, statement: Statement, cursor, error: BaseException | None) -> None:
        if error is None:
            self.after(cursor)
        else:
            self.failed()

    def phase_done(self, phase: Phase, results) -> None:
        self.transaction_ended()

    # -- the connection
    def attach(self, conn) -> None:
        """Measure on ``conn`` (a psycopg2 connection, or a peewee database: its connection)."""
        conn = conn.connection() if callable(getattr(conn, "connection", None)) else conn
        self._conn = conn
        with conn.cursor() as cur:
            cur.execute("SELECT pg_backend_pid(), current_setting('server_version_num')::int")
            self._pid, version = cur.fetchone()
        self._major = version // 10000

    def _cursor(self):
        return self._conn.cursor()

    def _in_transaction(self) -> bool:
        return self._conn.info.transaction_status != extensions.TRANSACTION_STATUS_IDLE

    def _relations(self) -> dict[int, _Relation]:
        with self._cursor() as cur:
            cur.execute(_RELATIONS)
            rows = cur.fetchall()
        out = {}
        for oid, filenode, kind, schema, name, table_oid, scanned in rows:
            qualified = name if schema == "public" else f"{schema}.{name}"
            out[oid] = _Relation(oid, filenode, kind, qualified, table_oid or oid, scanned)
        return out

    def _locks(self) -> dict[int, str]:
        with self._cursor() as cur:
            cur.execute(_LOCKS, (self._pid, _FIRST_USER_OID))
            held: dict[int, str] = {}
            for oid, mode in cur.fetchall():
                if strength(mode) > strength(held.get(oid, "")):
                    held[oid] = mode
            return held

    def _sampler(self) -> _Sampler | None:
        """Start the second connection's sampling; None (and a warning) when it cannot connect."""
        try:
            return _Sampler(self.target, self._pid)
        except DatabaseUnavailable as exc:  # the measuring must never stop a rehearsal
            log.warning("locks of a statement outside a transaction not sampled: %s", exc)
            return None

    # -- around each statement
    def _now(self) -> float:
        """Seconds since the start, without the time the meter's own queries took."""
        return time.monotonic() - self._t0 - self._spent

    def before(self, sql: str, migration: str = "", line: int | None = None) -> None:
        """Take the readings a statement is compared with, just before it is sent."""
        entered = time.monotonic()
        in_transaction = self._in_transaction()
        if self._phase_open and not in_transaction:  # the runner committed without telling
            self.transaction_ended()
        if not self._phase_open:
            self._phase += 1
            self._phase_open = in_transaction
        relations = self._relations()
        if self._known is None:
            self._known = set(relations)
        locks = self._locks() if in_transaction else {}
        sampler = None if in_transaction else self._sampler()
        number = self._counts[migration] = self._counts.get(migration, 0) + 1
        self._spent += time.monotonic() - entered
        self._line = line
        self._pending = (sql, migration, number, relations, locks, sampler, in_transaction,
                         time.monotonic())

    def after(self, cursor=None) -> None:
        """Read what the statement just sent did (``cursor``: its cursor, for the rows it changed)."""
        if self._pending is None:
            return
        sql, migration, number, before, locks_before, sampler, in_transaction, started = self._pending
        entered = time.monotonic()
        seconds = entered - started
        self._pending = None
        sampled = sampler.stop() if sampler is not None else {}
        after = self._relations()
        rel = {**before, **after}

        def table_of(oid: int) -> str | None:
            """The application table a relation belongs to; None for the batch's own new ones.

            An index the batch built is new: its lock blocks nobody. An existing index's lock
            counts for its table (the planner opens every index of a table it reads).
            """
            r, known = rel.get(oid), self._known or set()
            if r is None or oid not in known or r.table_oid not in known or r.table_oid not in rel:
                return None
            name = rel[r.table_oid].name
            return None if name in _OWN_TABLES else name

        held = self._by_table(locks_before, table_of)
        locks = {table: mode for table, mode in self._by_table(
                     self._locks() if in_transaction else sampled, table_of).items()
                 if strength(mode) > strength(held.get(table, ""))}
        for oid in list(rel):
            if (table := table_of(oid)) in locks:
                self._sizes.setdefault(table, rel[oid].table_oid)
        rewritten = sorted({t for oid, r in before.items() if (t := table_of(oid))
                            and oid in after and r.filenode and after[oid].filenode != r.filenode})
        indexed = sorted({t for oid, r in after.items() if oid not in before and r.kind in "iI"
                          and (t := table_of(r.table_oid))})
        scanned = {t: after[oid].scanned - r.scanned for oid, r in before.items()
                   if (t := table_of(oid)) and oid in after and after[oid].scanned > r.scanned}
        rows = _rows_changed(sql, cursor)
        self._read_sizes()
        self._spent += time.monotonic() - entered
        if not in_transaction:
            self.phase_ends[self._phase] = self._now()
        self.statements.append(StatementMeasure(
            migration, number, sql, self._phase, round(self._now() - seconds, 4), round(seconds, 4),
            locks, tuple(rewritten), scanned, tuple(indexed), rows, in_transaction,
            sampled=not in_transaction, line=self._line))

    @staticmethod
    def _by_table(locks: dict[int, str], table_of) -> dict[str, str]:
        """Return the strongest mode held on each application table (its indexes' count for it)."""
        out: dict[str, str] = {}
        for oid, mode in locks.items():
            table = table_of(oid)
            if table and strength(mode) > strength(out.get(table, "")):
                out[table] = mode
        return out

    def _read_sizes(self) -> None:
        """Read the size of each table newly locked (it holds a lock already: reading adds none)."""
        unread = {oid: name for name, oid in self._sizes.items() if name not in self.sizes}
        if not unread:
            return
        with self._cursor() as cur:
            cur.execute(_SIZES, (list(unread),))
            for oid, size, rows in cur.fetchall():
                self.sizes[unread[oid]] = TableSize(int(size or 0), max(0, int(rows or 0)))

    def failed(self) -> None:
        """The statement raised: forget it (its transaction is rolled back, nothing to read)."""
        if self._pending is not None and self._pending[5] is not None:
            self._pending[5].stop()
        self._pending = None

    def transaction_ended(self) -> None:
        """Mark the end of the open transaction (call it right after its COMMIT)."""
        if self._phase_open:
            self.phase_ends[self._phase] = self._now()
            self._phase_open = False

    def report(self) -> LockReport:
        """Return what was measured (the open transaction, if any, ends now)."""
        self.transaction_ended()
        return LockReport(tuple(self.statements), dict(self.phase_ends), dict(self.sizes),
                          self._major)


def _rows_changed(sql: str, cursor) -> dict[str, int]:
    """Return {table: rows} for an UPDATE or DELETE: their row locks block writers to those rows."""
    count = getattr(cursor, "rowcount", -1) if cursor is not None else -1
    words = sql.split(None, 1)
    if count is None or count <= 0 or not words or words[0].upper() not in ("UPDATE", "DELETE", "WITH"):
        return {}
    try:  # psycopg2's placeholders read as PostgreSQL's own
        stmt = pglast.parse_sql(_PLACEHOLDER.sub("$1", sql).replace("%%", "%"))[0].stmt
    except Exception:  # noqa: BLE001 - psycopg2's %s placeholders, or SQL pglast cannot read
        return {}
    relation = getattr(stmt, "relation", None)
    if not isinstance(stmt, (ast.UpdateStmt, ast.DeleteStmt)) or relation is None:
        return {}
    name = relation.relname if relation.schemaname in (None, "public") else (
        f"{relation.schemaname}.{relation.relname}")
    return {} if name in _OWN_TABLES else {name: count}


def execute_measured(plan: Plan, target: Target, settings: Settings, **kwargs) -> tuple[RunReport, LockReport]:
    """Run ``plan`` on ``target`` (a copy) as :func:`dbcore.migrate.runner.execute` does, measuring it.

    Returns the run's report and what its statements did to the tables; raises what execute raises.
    """
    meter = LockMeter(target)
    report = execute(plan, target, settings, observers=[meter], **kwargs)
    return report, meter.report()
