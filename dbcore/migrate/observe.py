"""What a run of the runner shows other modules: each statement a migration sends, each phase, each COMMIT.

:class:`RunObserver` is the seam: pass observers to :func:`dbcore.migrate.runner.execute` to
measure the locks a statement takes, compare the SQL sent with a rehearsal's before a COMMIT, or
enforce a deadline. :class:`SqlRecorder` is how the runner sees the statements: it wraps one
database object's ``execute_sql`` (no global logger or patch), records what a migration sends and
shows it to the observers.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import peewee

from dbcore.migrate.plan import MigrationResult, Phase


@dataclass(frozen=True)
class Statement:
    """One statement a migration sends, as a :class:`RunObserver` sees it."""

    migration: str
    phase: Phase
    sql: str
    params: Any
    db: peewee.Database  # the run's session: an observer may query it (neither recorded nor observed)
    #: the line of the migrator call in the migration file that queued it (None: the product's own)
    line: int | None = None


class RunObserver:
    """Told what an execution does, at the points other modules hook into; every method is a no-op here.

    Subclass it and override what you need. The observer's own queries on ``db`` are neither
    recorded nor observed. Raising from a method stops the run like a failing migration: inside a
    batch phase, the phase's transaction is rolled back.
    """

    def phase_started(self, phase: Phase, db: peewee.Database) -> None:
        """Before a phase's first migration (for an "alone" phase: the last point nothing of it ran)."""

    def statement_started(self, statement: Statement) -> None:
        """Before a statement a migration sends reaches the server."""

    def statement_done(self, statement: Statement, cursor: Any, error: BaseException | None) -> None:
        """After it: ``cursor`` is the statement's cursor (None when it failed with ``error``)."""

    def before_commit(self, phase: Phase, results: Sequence[MigrationResult], db: peewee.Database) -> None:
        """In a batch phase, after its last migration, before its COMMIT (a dry run's: where it would commit)."""

    def phase_done(self, phase: Phase, results: Sequence[MigrationResult]) -> None:
        """After a phase committed (a dry run's: ended, to be rolled back with the rest)."""


class Observers(RunObserver):
    """Several observers as one, called in the order given."""

    def __init__(self, observers: Sequence[RunObserver]) -> None:
        self.observers = tuple(observers)

    def phase_started(self, phase, db):
        for o in self.observers:
            o.phase_started(phase, db)

    def statement_started(self, statement):
        for o in self.observers:
            o.statement_started(statement)

    def statement_done(self, statement, cursor, error):
        for o in self.observers:
            o.statement_done(statement, cursor, error)

    def before_commit(self, phase, results, db):
        for o in self.observers:
            o.before_commit(phase, results, db)

    def phase_done(self, phase, results):
        for o in self.observers:
            o.phase_done(phase, results)


class SqlRecorder:
    """Records (and shows the observer) the statements one database object sends while a migration runs.

    It wraps that object's ``execute_sql`` only: no global logger or patch, so two runs in one
    process (a rehearsal and an apply, or tests in threads) never see each other's SQL. The
    observer's own queries are sent with recording paused.
    """

    def __init__(self, db: peewee.Database, observer: RunObserver) -> None:
        self.db = db
        self.observer = observer
        self._on: tuple[list[str], str, Phase] | None = None
        #: the line of each statement recorded, from the ``where`` given to :meth:`recording`
        self.lines: list[int | None] = []
        self._where: Callable[[], Any] = lambda: None
        self._original = db.execute_sql
        db.execute_sql = self._execute_sql  # type: ignore[method-assign]  # on this object only

    def _execute_sql(self, sql, params=None, *args, **kwargs):
        if self._on is None:
            return self._original(sql, params, *args, **kwargs)
        statements, migration, phase = self._on
        statements.append(sql if not params else f"{sql} -- params: {list(params)!r}")
        site = self._where()
        self.lines.append(site.line if site else None)
        statement = Statement(migration, phase, sql, params, self.db, self.lines[-1])
        with self._paused():
            self.observer.statement_started(statement)
        try:
            cursor = self._original(sql, params, *args, **kwargs)
        except BaseException as exc:
            with self._paused():
                self.observer.statement_done(statement, None, exc)
            raise
        with self._paused():
            self.observer.statement_done(statement, cursor, None)
        return cursor

    @contextmanager
    def _paused(self) -> Iterator[None]:
        on, self._on = self._on, None
        try:
            yield
        finally:
            self._on = on

    @contextmanager
    def recording(self, migration: str, phase: Phase,
                  where: Callable[[], Any] | None = None) -> Iterator[list[str]]:
        """Record what the block sends on behalf of ``migration``; yield the list it fills.

        ``where()`` tells the call site (``.line``) each statement comes from, or None.
        """
        statements: list[str] = []
        self.lines, self._where = [], where or (lambda: None)
        self._on = (statements, migration, phase)
        try:
            yield statements
        finally:
            self._on = None
