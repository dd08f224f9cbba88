"""The replay of applied migrations: their code runs again to rebuild the models, and sends nothing.

To know the models as the applied migrations left them (what ``migrator.orm["x"]`` returns to a
pending migration), every applied file's ``migrate()`` runs again. Nothing it would send may
reach a database: a migration that writes through ``migrator.orm[...]`` (peewee-migrate's own
``002_test.py`` does ``Person.create(...)``) would otherwise write again at every later apply.

- The replay's migrator and its ``database`` argument are a :class:`ReplayDatabase`: a peewee
  PostgreSQL database that is never connected; every statement it is given is held back and
  answers as an empty result.
- Databases the migration's module reaches by itself (an app's ``db`` it imports, the models
  bound to it, the target database) are guarded for this thread only while the file replays:
  their statements are held back too. Other threads, and this thread outside the replay, are
  untouched; nothing process-wide is patched (peewee-migrate patches ``Database.execute_sql``
  and ``Model.select`` for every thread during its fake runs).
- Queued operations (``migrator.sql``, ``run``/``python`` callables) are dropped, never run.
"""

from __future__ import annotations

import logging
import threading
import types
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import peewee

log = logging.getLogger(__name__)


class _HeldBackCursor:
    """A DB-API cursor whose statements go nowhere: every query answers with no rows."""

    rowcount = 0
    lastrowid = None
    description = ()

    def __init__(self, held: list[str]) -> None:
        self._held = held

    def execute(self, sql, params=None):
        self._held.append(sql)

    def executemany(self, sql, seq):
        self._held.append(sql)

    def fetchone(self):
        return None

    def fetchall(self):
        return []

    def fetchmany(self, size=None):
        return []

    def __iter__(self):
        return iter(())

    def close(self):
        pass


class _NoConnection:
    """What a :class:`ReplayDatabase` gets instead of a connection: cursors that send nothing."""

    autocommit = True

    def __init__(self, held: list[str]) -> None:
        self._held = held

    def cursor(self, *args, **kwargs):
        return _HeldBackCursor(self._held)

    def commit(self):
        pass

    def rollback(self):
        pass

    def close(self):
        pass


class ReplayDatabase(peewee.PostgresqlDatabase):
    """A PostgreSQL database object that never connects: what replayed migrations run against.

    ``held_back`` lists the statements the replayed code tried to send.
    """

    def __init__(self, name: str = "replay", server_version: int | None = None):
        super().__init__(name, autoconnect=True)
        self.held_back: list[str] = []
        self.server_version = server_version or 150000

    def _connect(self):
        return _NoConnection(self.held_back)

    def _set_server_version(self, conn):
        pass

    def is_connection_usable(self):
        return not self._state.closed

    def _close(self, conn):
        pass


_replaying = threading.local()
_guard_lock = threading.Lock()
_GUARDED = "_dbcore_replay_guard"


def _guard(db: peewee.Database, held: list[str]) -> None:
    """Make ``db`` hold back what this thread sends while it replays (installed once per object)."""
    if getattr(db, _GUARDED, False) or isinstance(db, ReplayDatabase):
        return
    with _guard_lock:
        if getattr(db, _GUARDED, False):
            return

        def held_back(name):
            original = getattr(db, name)

            def call(*args, **kwargs):
                sink = getattr(_replaying, "held", None)
                if sink is None:
                    return original(*args, **kwargs)
                if name in ("execute_sql", "cursor"):
                    sink.append(str(args[0]) if args and name == "execute_sql" else f"-- {name}")
                    cursor = _HeldBackCursor(sink)
                    return cursor
                return None  # begin / commit / rollback: nothing to end

            return call

        for name in ("execute_sql", "cursor", "begin", "commit", "rollback"):
            setattr(db, name, held_back(name))
        setattr(db, _GUARDED, True)


def databases_reached(scope: dict) -> set[peewee.Database]:
    """Return the peewee databases a migration module's namespace reaches (one module level deep)."""
    found: dict[int, peewee.Database] = {}

    def add(value) -> None:
        if isinstance(value, peewee.Proxy):
            value = value.obj
        if isinstance(value, peewee.Database):
            found[id(value)] = value
        elif isinstance(value, type) and issubclass(value, peewee.Model):
            meta = getattr(value, "_meta", None)  # peewee.Model itself has none
            if meta is not None and meta.database is not None:
                add(meta.database)

    for value in list(scope.values()):
        add(value)
        if isinstance(value, types.ModuleType):
            for inner in list(vars(value).values()):
                add(inner)
    return set(found.values())


@dataclass(frozen=True)
class ReplayProblem:
    """An applied file whose replay raised: what failed, so that a later error can say so."""

    name: str
    error: str

    def describe(self) -> str:
        return f"replaying applied migration {self.name}.py failed: {self.error}"


@dataclass(frozen=True)
class ReplayResult:
    """What a replay did: the files replayed, those that failed, the statements held back."""

    replayed: tuple[str, ...]
    problems: tuple[ReplayProblem, ...]
    held_back: int


def replay(migrator, names: Iterable[str], read: Callable[[str], tuple[Callable, dict]],
           guarded: Iterable[peewee.Database] = ()) -> ReplayResult:
    """Run each applied file's migrate() on ``migrator`` (bound to a ReplayDatabase); send nothing.

    ``read(name)`` returns the file's migrate function and its module namespace. A file that
    raises is recorded as a :class:`ReplayProblem` and the replay goes on: the models it would
    have defined are missing, which matters only to a pending migration that asks for them.
    """
    database = migrator.database
    held = database.held_back
    problems: list[ReplayProblem] = []
    done: list[str] = []
    for name in names:
        try:
            migrate, scope = read(name)
            for db in set(guarded) | databases_reached(scope):
                _guard(db, held)
            _replaying.held = held
            migrate(migrator, database, fake=True)
        except Exception as exc:  # an old file the current API cannot replay
            problem = ReplayProblem(name, f"{type(exc).__name__}: {str(exc)[:300]}")
            log.warning("%s; the replay goes on without it", problem.describe())
            problems.append(problem)
        finally:
            _replaying.held = None
            migrator.drop_queued()
        done.append(name)
    if held:
        log.info("replay of %d applied migration(s) held back %d statement(s)", len(done), len(held))
    return ReplayResult(tuple(done), tuple(problems), len(held))
