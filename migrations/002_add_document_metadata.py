"""002: a JSONB metadata column on documents (nullable: no default, no rewrite)."""

import peewee as pw
from playhouse.postgres_ext import BinaryJSONField


class Document(pw.Model):
    filename = pw.CharField(max_length=500)

    class Meta:
        table_name = "document"


def migrate(migrator, database, *, fake=False):
    """Add document.metadata."""
    migrator.add_columns(Document, metadata=BinaryJSONField(null=True))


def rollback(migrator, database, *, fake=False):
    """Drop document.metadata."""
    migrator.drop_columns(Document, "metadata")
