"""001: the initial schema: projects, their source folders and documents."""

import datetime

import peewee as pw


def _now():
    return datetime.datetime.now(datetime.timezone.utc)


class BaseModel(pw.Model):
    created_at = pw.DateTimeField(default=_now)
    updated_at = pw.DateTimeField(default=_now)


class Project(BaseModel):
    name = pw.CharField(max_length=200, unique=True)

    class Meta:
        table_name = "project"


class SourceDir(BaseModel):
    project = pw.ForeignKeyField(Project, backref="sourcedirs", on_delete="CASCADE")
    path = pw.CharField(max_length=500)

    class Meta:
        table_name = "sourcedir"


class Document(BaseModel):
    sourcedir = pw.ForeignKeyField(SourceDir, backref="documents", on_delete="CASCADE")
    filename = pw.CharField(max_length=500)
    content = pw.TextField(default="")

    class Meta:
        table_name = "document"


def migrate(migrator, database, *, fake=False):
    """Create the three tables."""
    migrator.create_model(Project)
    migrator.create_model(SourceDir)
    migrator.create_model(Document)


def rollback(migrator, database, *, fake=False):
    """Drop the three tables this migration created, dependents first."""
    migrator.remove_model("document")
    migrator.remove_model("sourcedir")
    migrator.remove_model("project")
