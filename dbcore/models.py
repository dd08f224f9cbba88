"""The sample application's models (the guide's ``db_models.py``), kept in sync with migrations/.

The drift check (``dbmigrate check``) compares these with the live database, so a migration that
forgets a column, an index or a NOT NULL shows up before it reaches production.
"""

from __future__ import annotations

import datetime

import peewee as pw
from playhouse.postgres_ext import BinaryJSONField


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


class BaseModel(pw.Model):
    """Common timestamps; not bound to a database: each command binds the target it acts on."""

    created_at = pw.DateTimeField(default=_now)
    updated_at = pw.DateTimeField(default=_now)


class Project(BaseModel):
    """A customer project."""

    name = pw.CharField(max_length=200, unique=True)
    slug = pw.CharField(max_length=200, null=True, unique=True)

    class Meta:
        table_name = "project"


class SourceDir(BaseModel):
    """A folder of source documents in one language."""

    project = pw.ForeignKeyField(Project, backref="sourcedirs", on_delete="CASCADE")
    path = pw.CharField(max_length=500)
    language = pw.CharField(max_length=2)

    class Meta:
        table_name = "sourcedir"
        indexes = ((("project", "path", "language"), True),)


class Document(BaseModel):
    """One document inside a source folder."""

    sourcedir = pw.ForeignKeyField(SourceDir, backref="documents", on_delete="CASCADE")
    filename = pw.CharField(max_length=500)
    content = pw.TextField(default="")
    metadata = BinaryJSONField(null=True)

    class Meta:
        table_name = "document"


#: every model of the application, in dependency order
MODELS: list[type[pw.Model]] = [Project, SourceDir, Document]
