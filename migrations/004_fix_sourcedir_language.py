"""004: every source folder gets a required two-letter language, unique per project and path.

The guide's three steps for a required column, so that no row is ever NULL and no step holds a
long lock: add it nullable with a default, fill existing rows, then SET NOT NULL and DROP DEFAULT.
"""

import peewee as pw


class BaseModel(pw.Model):
    created_at = pw.DateTimeField()
    updated_at = pw.DateTimeField()


class SourceDir(BaseModel):
    path = pw.CharField(max_length=500)

    class Meta:
        table_name = "sourcedir"


def migrate(migrator, database, *, fake=False):
    """Add sourcedir.language in three steps, then its unique index."""
    # 1. nullable, with a database default: a constant default is metadata only in PostgreSQL
    #    11+, so no row is rewritten and the table is locked for an instant. (A Python
    #    `default="el"` would instead make peewee-migrate UPDATE every row in this step.)
    migrator.add_columns(
        SourceDir,
        language=pw.CharField(max_length=2, null=True, constraints=[pw.SQL("DEFAULT 'el'")]),
    )
    # 2. fill existing rows (none are NULL after step 1, but rows written by an older app
    #    version between the steps could be)
    migrator.sql("UPDATE sourcedir SET language = %s WHERE language IS NULL", "el")
    # 3. required, and no default any more: new rows must say their language
    migrator.sql("ALTER TABLE sourcedir ALTER COLUMN language SET NOT NULL")
    migrator.sql("ALTER TABLE sourcedir ALTER COLUMN language DROP DEFAULT")
    migrator.sql(
        'CREATE UNIQUE INDEX "sourcedir_project_id_path_language" '
        'ON "sourcedir" ("project_id", "path", "language")'
    )


def rollback(migrator, database, *, fake=False):
    """Drop the index and the column."""
    migrator.sql('DROP INDEX IF EXISTS "sourcedir_project_id_path_language"')
    migrator.drop_columns(SourceDir, "language")
