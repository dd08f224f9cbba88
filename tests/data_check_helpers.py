"""A data migration with a bug, and the team's checks that catch it (verify() or a SQL file):
shared by tests/dbcore/test_data_checks.py and tests/flows/test_data_checks_flow.py."""

from __future__ import annotations

from helpers import query

VERIFY_MIGRATION = '''\
"""005: drafts lose their slug (a data migration with a bug the team's check catches)."""

import peewee as pw


class Project(pw.Model):
    slug = pw.CharField(null=True)

    class Meta:
        table_name = "project"


def migrate(migrator, database, *, fake=False):
    migrator.sql("UPDATE project SET slug = NULL WHERE name LIKE %s", "draft%")


def rollback(migrator, database, *, fake=False):
    migrator.sql("UPDATE project SET slug = lower(name) || '-' || id WHERE slug IS NULL")
'''

VERIFY_FUNCTION = '''

def verify(database):
    """every project has a slug"""
    return Project.select(Project.id).where(Project.slug.is_null())
'''

SQL_CHECK = "-- every project has a slug\nSELECT id, name FROM project WHERE slug IS NULL;\n"


def add_failing_check(migrations_dir, kind: str) -> None:
    """Add 005 (which empties the drafts' slugs) and a check of ``kind`` that catches it."""
    (migrations_dir / "005_clear_draft_slugs.py").write_text(
        VERIFY_MIGRATION + (VERIFY_FUNCTION if kind == "verify" else ""))
    if kind == "sql":
        (migrations_dir / "checks").mkdir(exist_ok=True)
        (migrations_dir / "checks" / "project_slug_filled.sql").write_text(SQL_CHECK)


def seed_projects(url: str) -> None:
    query(url, "INSERT INTO project (name, slug, created_at, updated_at) SELECT n, n || '-s', now(), now() "
               "FROM unnest(ARRAY['draft-secret-one', 'draft-secret-two', 'kept']) n")
