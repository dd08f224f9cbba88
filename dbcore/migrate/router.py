"""peewee-migrate's Router and Migrator as this product uses them: files read through
:func:`dbcore.migrate.files.load` (errors name the file), and the replay of applied files.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from unittest import mock

import peewee
from peewee_migrate import Migrator as _PeeweeMigrateMigrator
from peewee_migrate import Router
from peewee_migrate.models import MigrateHistory

from dbcore.errors import MigrationFileError
from dbcore.migrate.files import discover, load

log = logging.getLogger(__name__)


class Migrator(_PeeweeMigrateMigrator):
    """peewee-migrate's Migrator with the guide's vocabulary: ``add_columns`` / ``drop_columns``."""

    def add_columns(self, model, **fields: peewee.Field):
        """Add columns (the guide's name for ``add_fields``)."""
        return self.add_fields(model, **fields)

    def drop_columns(self, model, *names, cascade: bool = True):
        """Drop columns by field or column name; ``drop_columns(M, ["a", "b"])`` works too."""
        flat = [n for name in names for n in ([name] if isinstance(name, str) else name)]
        model = self.__get_model__(model)
        meta = model._meta
        known = {f.name for f in meta.fields.values()} | {f.column_name for f in meta.fields.values()}
        by_column = {f.column_name: f.name for f in meta.fields.values()}
        fields = [by_column.get(n, n) for n in flat if n in known]
        if fields:
            self.remove_fields(model, *fields, cascade=cascade)
        # peewee-migrate skips names the model class does not define: a rollback would then
        # silently do nothing. Drop those by column name instead.
        for name in (n for n in flat if n not in known):
            self.__ops__.append(
                self.__migrator__.drop_column(meta.table_name, name, cascade=cascade))
        return model

    def add_column(self, *args, **kwargs):
        raise MigrationFileError("migrator.add_column does not exist: use migrator.add_columns(Model, name=Field(...))")

    def drop_column(self, *args, **kwargs):
        raise MigrationFileError("migrator.drop_column does not exist: use migrator.drop_columns(Model, 'name')")


class FileRouter(Router):
    """peewee-migrate's Router, reading files through :func:`load` so errors name the file."""

    def __init__(self, database: peewee.Database, migrations_dir: Path, **kwargs):
        super().__init__(database, migrate_dir=Path(migrations_dir), migrator_class=Migrator,
                         logger=log, **kwargs)
        self._files = {f.name: f for f in discover(self.migrate_dir)}

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
        """A migrator that knows the models as the applied migrations left them.

        peewee-migrate replays every applied migration with ``peewee.Database.execute_sql``
        patched process-wide: any other thread's queries vanish meanwhile. Here the replay hands
        migrate() a stand-in database and drops the queued operations: nothing runs, and
        nothing outside this router is touched.
        """
        migrator = self.migrator_class(self.database)
        for name in self.done:
            migrate, _ = self.read(name)
            migrate(migrator, mock.MagicMock(name="replay-database"), fake=True)
            migrator.__ops__ = []
        return migrator

    def read(self, name: str):
        file = self._files.get(name)
        if file is None:
            raise MigrationFileError(
                f"migration {name} is recorded as applied but {name}.py is missing from "
                f"{self.migrate_dir}: restore the file from version control"
            )
        loaded = load(file)
        return loaded.migrate, loaded.rollback or (lambda *a, **k: None)
