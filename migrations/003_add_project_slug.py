"""003: a unique URL slug for projects, filled from their names."""

import peewee as pw


class Project(pw.Model):
    name = pw.CharField(max_length=200, unique=True)

    class Meta:
        table_name = "project"


def migrate(migrator, database, *, fake=False):
    """Add project.slug, fill it for existing rows, then make it unique."""
    migrator.add_columns(Project, slug=pw.CharField(max_length=200, null=True))
    migrator.sql(
        "UPDATE project SET slug = trim(both '-' from lower(regexp_replace(name, %s, '-', 'g')))"
        " || '-' || id",
        "[^a-zA-Z0-9]+",
    )
    migrator.sql('CREATE UNIQUE INDEX "project_slug" ON "project" ("slug")')


def rollback(migrator, database, *, fake=False):
    """Drop the index and the column."""
    migrator.sql('DROP INDEX IF EXISTS "project_slug"')
    migrator.drop_columns(Project, "slug")
