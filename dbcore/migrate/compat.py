"""The Migrator applied and replayed migrations get: peewee-migrate 2.x plus the 1.x API real projects wrote.

peewee-migrate's API moved between 1.x and 2.x: 1.6 flushes the queued operations with a bare
``migrator.run()``, 1.7-1.11 with ``migrator()``; 1.12 turned ``run(fn)`` into "queue a Python
function"; 1.14 removed ``add_columns``/``drop_columns``/``drop_table``/``python``. A project's
history holds files of every era, and each must still replay and apply. The supported surface
and what is refused are listed in docs/migrations.md.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Callable, cast

import peewee
from peewee_migrate import Migrator as _PeeweeMigrateMigrator
from peewee_migrate.migrator import ORM as _ORM
from peewee_migrate.migrator import SchemaMigrator
from playhouse.migrate import Operation, make_index_name

from dbcore.errors import MigrationFileError, UnknownModel
from dbcore.migrate.backfill import Backfill


@dataclass(frozen=True)
class CallSite:
    """Where in a migration file a statement comes from: the line of the migrator call that queued it."""

    file: str
    line: int


def site_in(path: str | None, frame) -> CallSite | None:
    """Return the innermost line of file ``path`` on the stack from ``frame`` outwards (None if absent)."""
    while path and frame is not None:
        if frame.f_code.co_filename == path:
            return CallSite(path, frame.f_lineno)
        frame = frame.f_back
    return None


class _Queue(list):
    """The migrator's queued operations, each with the call site in the running migration that queued it.

    Operations run later, at the flush (after migrate() returned, or at a 1.x ``migrator.run()``):
    the line that queued one is only known now.
    """

    def __init__(self, owner: Migrator, ops=()):
        super().__init__(ops)
        self.owner = owner
        self.sites: list[CallSite | None] = list(getattr(ops, "sites", [None] * len(self)))

    def append(self, op) -> None:
        super().append(op)
        self.sites.append(site_in(self.owner.running_file, sys._getframe(1)))

    def extend(self, ops) -> None:
        ops = list(ops)
        super().extend(ops)
        self.sites.extend([site_in(self.owner.running_file, sys._getframe(1))] * len(ops))


class ORM(_ORM):
    """peewee-migrate's ORM, answering by table name or class name, and read like 1.x's dict."""

    __slots__ = ("problems",)

    def __init__(self):
        super().__init__()
        #: the applied files whose replay failed: named when a model is missing
        self.problems: tuple = ()

    def __getitem__(self, name: str):
        model = self.__tables__.get(name) or self.__models__.get(name)
        if model is None:
            tables = sorted(self.__tables__)
            known = ", ".join(tables[:10]) + (f" and {len(tables) - 10} more" if len(tables) > 10 else "")
            why = "".join(f"; {p.describe()}" for p in self.problems)
            raise UnknownModel(f"no model {name!r} in the migration history (tables known: "
                               f"{known or 'none'}{why}): define the model class in the migration "
                               "and pass it instead of its name")
        return model

    def __contains__(self, name: str) -> bool:
        return name in self.__tables__ or name in self.__models__

    def get(self, name: str, default=None):
        return self.__tables__.get(name) or self.__models__.get(name) or default

    def keys(self):
        return self.__tables__.keys()

    def values(self):
        return self.__tables__.values()

    def items(self):
        return self.__tables__.items()

    def __len__(self) -> int:
        return len(self.__tables__)


class Migrator(_PeeweeMigrateMigrator):
    """peewee-migrate 2.x's Migrator, with the guide's names and the 1.x API.

    ``replay`` (optional) fills :attr:`orm` the first time it is read: a pending migration that
    only calls ``migrator.sql`` never pays for the replay of the applied files.
    """

    #: True while applied files replay: flushes drop the queued operations instead of running them
    replaying = False
    #: the apply's safe forms (dbcore.migrate.safe_forms.SafeForms): set by the runner; None runs
    #: every operation in its plain form, as pw_migrate does
    safe = None
    #: the migration file running now (its path, as compiled): where call sites are looked for
    running_file: str | None = None
    #: the call site of the queued operation being flushed
    flushing: CallSite | None = None
    #: while replaying: the columns each table of the database has now (None: not known)
    actual_columns: dict[str, set[str]] | None = None

    def __init__(self, database: peewee.Database, *, replay: Callable[[Migrator], None] | None = None):
        self._replay = replay
        super().__init__(database)
        self._orm = ORM()

    @property  # type: ignore[override]  # an attribute in peewee-migrate; here it replays when first read
    def orm(self) -> ORM:
        if self._replay is not None:
            replay, self._replay = self._replay, None
            # what the replay reads (the history) is the product's, not the running migration's
            running, self.running_file = self.running_file, None
            try:
                replay(self)
            finally:
                self.running_file = running
        return self._orm

    @orm.setter
    def orm(self, value) -> None:
        self._orm = value

    @property
    def replayed(self) -> bool:
        """True once the applied files were replayed (or none had to be)."""
        return self._replay is None

    # -- 1.x attributes ----------------------------------------------------------------------

    @property
    def database(self) -> peewee.Database:
        """The database the migrator runs on (1.x's ``migrator.database``)."""
        return cast(peewee.Database, self.__database__)  # never a Proxy here

    @property
    def ops(self) -> list:
        return self.__ops__

    @property
    def migrator(self):
        return self.__migrator__

    # peewee-migrate's plain list becomes a queue that also keeps each operation's call site
    @property  # type: ignore[override]
    def __ops__(self) -> _Queue:
        return self._queue

    @__ops__.setter
    def __ops__(self, ops) -> None:
        self._queue = ops if isinstance(ops, _Queue) else _Queue(self, ops)

    @contextlib.contextmanager
    def running(self, path) -> Iterator[None]:
        """Record call sites in migration file ``path`` while its migrate() or rollback() runs."""
        before, self.running_file = self.running_file, str(path)
        try:
            yield
        finally:
            self.running_file, self.flushing = before, None

    def call_site(self) -> CallSite | None:
        """Return the line of the running migration a statement sent now comes from.

        During a flush, the call that queued the operation; otherwise the migration's own line on
        the stack (``database.execute_sql``, a savepoint it opened). None: the product's own
        statement (history, introspection), not the migration's.
        """
        return self.flushing or site_in(self.running_file, sys._getframe(1))

    def rebind(self, database: peewee.Database) -> None:
        """Run on ``database`` from now on: the schema migrator and every model of :attr:`orm`."""
        self.__database__ = database
        self.__migrator__ = SchemaMigrator.from_database(database)
        for model in self._orm:
            model._meta.database = database

    # -- running the queue ---------------------------------------------------------------------

    def flush(self) -> None:
        """Run the queued operations now, in the current transaction (dropped while replaying)."""
        ops, self.__ops__ = self.__ops__, []
        if self.replaying:
            return
        # Migrator.__call__ would wrap these in its own atomic(): the runner decides the transaction.
        try:
            for op, site in zip(ops, ops.sites):
                self.flushing = site
                if isinstance(op, Backfill):
                    if self.safe is None:
                        raise MigrationFileError("migrator.backfill runs only under dbmigrate apply: "
                                                 "pw_migrate has no phase 3")
                    self.safe.defer(op.step(self.__database__))
                elif self.safe is not None:
                    self.safe.run(op)
                elif isinstance(op, Operation):
                    op.run()
                else:
                    op()
        finally:
            self.flushing = None

    def backfill(self, model, set: dict | None = None, where=None, *, function: Callable | None = None,
                 batch_size: int = 10_000, pause: float = 0.0):
        """Queue a batched backfill, run after the batch's commit (phase 3): this product's own.

        ``set`` maps columns to values (a ``peewee.SQL``/expression is SQL, anything else a value);
        ``where`` (SQL text) limits the rows; or ``function=fill``, a module-level
        ``def fill(database, low, high)`` of the file that updates the rows whose primary key is
        in ``(low, high]``. One transaction per ``batch_size`` keys, ``pause`` seconds between.
        """
        if batch_size < 1:
            raise MigrationFileError("migrator.backfill: batch_size must be 1 or more")
        table = model if isinstance(model, str) and model not in self._orm else (
            self.__get_model__(model)._meta.table_name)
        self.__ops__.append(Backfill(table, dict(set or {}), where, function, batch_size, pause))

    def drop_queued(self) -> None:
        """Forget the queued operations without running them."""
        self.__ops__ = []

    clean = drop_queued  # 1.x

    def __call__(self):
        """1.7-1.11: ``migrator()`` runs what is queued."""
        self.flush()

    def run(self, func: Callable | None = None, *args, **kwargs):
        """1.12+: queue ``func(*args, **kwargs)``; up to 1.6 a bare ``run()`` ran what is queued."""
        if func is None:
            return self.flush()
        return super().run(func, *args, **kwargs)

    def python(self, func: Callable, *args, **kwargs):
        """1.x: queue a Python function (``run(fn)`` since 1.12)."""
        return super().run(func, *args, **kwargs)

    # -- 1.x names ----------------------------------------------------------------------------

    def create_table(self, model):
        return self.create_model(model)

    def drop_table(self, model, cascade: bool = True):
        return self.remove_model(model, cascade=cascade)

    def add_columns(self, model, **fields: peewee.Field):
        """Add columns (the guide's and 1.x's name for ``add_fields``)."""
        return self.add_fields(model, **fields)  # type: ignore[arg-type]  # fields by name

    def change_columns(self, model, **fields: peewee.Field):
        return self.change_fields(model, **fields)

    def rename_column(self, model, old_name: str, new_name: str):
        return self.rename_field(model, old_name, new_name)

    def drop_columns(self, model, *names, cascade: bool = True):
        """Drop columns by field or column name; ``drop_columns(M, ["a", "b"])`` works too.

        A list is read two ways (docs/migrations.md): peewee-migrate takes it as one name no field
        has and drops nothing; a pending file (the lint's DM012 made it explicit) drops each column.
        Replaying an applied file, the database says which reading ran: a listed column it still
        has was not dropped, so the replayed model keeps it.
        """
        model = self.__get_model__(model)
        meta = model._meta
        still_there = (self.actual_columns or {}).get(meta.table_name, set()) if self.replaying else set()
        flat = [n for name in names for n in ([name] if isinstance(name, str) else
                                              [x for x in name if x not in still_there])]
        known = {f.name for f in meta.fields.values()} | {f.column_name for f in meta.fields.values()}
        by_column = {f.column_name: f.name for f in meta.fields.values()}
        fields = [by_column.get(n, n) for n in flat if n in known]
        if fields:
            super().remove_fields(model, *fields, cascade=cascade)
        # peewee-migrate skips names the model class does not define: a rollback would then
        # silently do nothing. Drop those by column name instead.
        for name in (n for n in flat if n not in known):
            self.__ops__.append(self.__migrator__.drop_column(meta.table_name, name, cascade=cascade))
        return model

    def remove_fields(self, model, *names: str, cascade: bool = True, **params):
        return self.drop_columns(model, *names, cascade=cascade)

    def __get_model__(self, model):
        if isinstance(model, str):
            return self.orm[model]
        return model

    # -- indexes by field name or column name --------------------------------------------------

    def _columns(self, model, names) -> list[str]:
        """Column names for ``names``, each a field name, a column name (1.x files use both) or as is."""
        fields = model._meta.fields
        by_column = {f.column_name: f for f in fields.values()}
        return [field.column_name if (field := fields.get(n) or by_column.get(n)) is not None else n
                for n in names]

    def add_index(self, model, *columns: str, unique: bool = False, **index_params):
        """Create an index on fields named by field or column name (``add_index("wiki", "sid", "slug")``)."""
        model = self.__get_model__(model)
        meta = model._meta
        meta.indexes.append((columns, unique))
        names = self._columns(model, columns)
        if len(columns) == 1:
            field = meta.fields.get(columns[0]) or next(
                (f for f in meta.fields.values() if f.column_name == columns[0]), None)
            if field is not None:
                field.unique, field.index = unique, not unique
        self.__ops__.append(self.__migrator__.add_index(meta.table_name, names, unique=unique,
                                                        **index_params))
        return model

    def drop_index(self, model, *columns: str):
        """Drop the index on fields named by field or column name."""
        model = self.__get_model__(model)
        meta = model._meta
        names = self._columns(model, columns)
        if len(columns) == 1 and columns[0] in meta.fields:
            meta.fields[columns[0]].unique = meta.fields[columns[0]].index = False
        meta.indexes = [(cols, u) for (cols, u) in meta.indexes if tuple(cols) != tuple(columns)]
        self.__ops__.append(self.__migrator__.drop_index(meta.table_name,
                                                         make_index_name(meta.table_name, names)))
        return model

    # -- refused with the name to use ------------------------------------------------------------

    def add_column(self, *args, **kwargs):
        raise MigrationFileError("migrator.add_column does not exist: use migrator.add_columns(Model, name=Field(...))")

    def drop_column(self, *args, **kwargs):
        raise MigrationFileError("migrator.drop_column does not exist: use migrator.drop_columns(Model, 'name')")
