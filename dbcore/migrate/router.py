"""peewee-migrate's Router as this product uses it: files read through
:func:`dbcore.migrate.files.load` (errors name the file), a history model per database, and a
migrator that replays the applied files only when a pending migration needs their models.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import cast

import peewee
from peewee_migrate import Router
from peewee_migrate.models import MigrateHistory

from dbcore.errors import MigrationFileError
from dbcore.migrate.compat import Migrator
from dbcore.migrate.files import discover, load
from dbcore.migrate.replay import ReplayDatabase, ReplayResult, replay

log = logging.getLogger(__name__)

__all__ = ["FileRouter", "Migrator"]


class FileRouter(Router):
    """peewee-migrate's Router, reading files through :func:`load` so errors name the file."""

    def __init__(self, database: peewee.Database, migrations_dir: Path, **kwargs):
        super().__init__(database, migrate_dir=Path(migrations_dir), migrator_class=Migrator,
                         logger=log, **kwargs)
        self._files = {f.name: f for f in discover(self.migrate_dir)}
        #: what the replay did, once a migration needed it (None: not replayed)
        self.replayed: ReplayResult | None = None

    @cached_property
    def model(self):
        """The history model, bound to this router's database only.

        peewee-migrate binds its one global MigrateHistory class to the last router's database;
        a subclass per router keeps two databases (a rehearsal copy and its source) apart.
        """
        database, table = self.database, self.migrate_table

        class History(MigrateHistory):
            class Meta:
                table_name = table

        History._meta.database = database
        History.create_table(safe=True)
        return History

    @cached_property
    def migrator(self) -> Migrator:
        """A migrator that knows the models as the applied migrations left them, when asked.

        The applied files replay the first time a migration reads ``migrator.orm`` or names a
        model by its table (dbcore.migrate.replay: nothing they would send is sent); a plan of
        ``migrator.sql`` migrations never replays anything.
        """
        return Migrator(self._database, replay=self._replay_into)

    def _replay_into(self, target: Migrator) -> None:
        version = getattr(self.database, "server_version", None)
        stand_in = ReplayDatabase(f"replay of {self.database.database}", server_version=version)
        replaying = Migrator(stand_in)
        replaying.replaying = True
        replaying.actual_columns = self._columns_now()
        names = list(self.done)
        self.replayed = replay(replaying, names, self._read_for_replay, guarded=[self._database])
        orm = replaying.orm
        orm.problems = self.replayed.problems
        target.orm = orm
        target.rebind(self._database)

    @property
    def _database(self) -> peewee.Database:
        """The target database (peewee-migrate types it as a Database or a Proxy; here it is a Database)."""
        return cast(peewee.Database, self.database)

    def _columns_now(self) -> dict[str, set[str]]:
        """Return the columns of each table the database has now (read before the replay guards it).

        Read through a cursor of its own, not ``execute_sql``: the product's read, not a statement
        of the migration being run.
        """
        cursor = self.database.cursor()
        cursor.execute("SELECT table_name, column_name FROM information_schema.columns "
                       "WHERE table_schema = current_schema()")
        columns: dict[str, set[str]] = {}
        for table, column in cursor.fetchall():
            columns.setdefault(table, set()).add(column)
        return columns

    def _read_for_replay(self, name: str):
        loaded = load(self._file(name))
        return loaded.migrate, loaded.scope

    def _file(self, name: str):
        file = self._files.get(name)
        if file is None:
            raise MigrationFileError(
                f"migration {name} is recorded as applied but {name}.py is missing from "
                f"{self.migrate_dir}: restore the file from version control"
            )
        return file

    def read(self, name: str):
        loaded = load(self._file(name))
        return loaded.migrate, loaded.rollback or (lambda *a, **k: None)
