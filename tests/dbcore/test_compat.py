"""peewee-migrate 1.x files, as real projects wrote them, apply and replay on a real PostgreSQL."""

from __future__ import annotations

import pytest
from helpers import apply_pending, query, rollback_last
from test_migrations import write

# 1.6: create_table, a bare migrator.run() flushing what is queued before the data loop, python(fn),
# migrator.database; 1.7-1.11: migrator() flushing; add_index by column name (the FK's "sid")
OLD_STYLE = """\
    import peewee as pw

    def migrate(migrator, database, fake=False, **kwargs):
        @migrator.create_table
        class Sub(pw.Model):
            sid = pw.CharField(max_length=40, primary_key=True)
            name = pw.CharField()

            class Meta:
                table_name = "sub"

        @migrator.create_model
        class Wiki(pw.Model):
            sub = pw.ForeignKeyField(model=Sub, column_name="sid", field="sid", null=True)
            slug = pw.CharField()

            class Meta:
                table_name = "wiki"

        migrator.run()  # 1.6: the tables exist from here on
        if not fake:
            Sub._meta.database = migrator.database
            Sub.create(sid="s1", name="first")
            database.execute_sql("UPDATE sub SET name = 'renamed' WHERE sid = 's1'")
        migrator.add_columns("sub", title=pw.CharField(null=True))
        migrator()  # 1.7-1.11: the same flush
        migrator.python(lambda: database.execute_sql("UPDATE sub SET title = name"))
        migrator.add_index("wiki", "sid", "slug", unique=True)

    def rollback(migrator, database, fake=False, **kwargs):
        migrator.drop_table("wiki")
        migrator.drop_table("sub")
    """
LATER = """\
    import peewee as pw

    # varchar(255) -> varchar(80) rewrites wiki: the safe forms refuse it unless the file allows it
    allow_table_rewrite = True

    def migrate(migrator, database, fake=False, **kwargs):
        migrator.rename_column("sub", "title", "heading")
        migrator.change_columns("wiki", slug=pw.CharField(max_length=80))
        migrator.add_not_null("wiki", "slug")

    def rollback(migrator, database, fake=False, **kwargs):
        migrator.rename_column("sub", "heading", "title")
    """


@pytest.fixture
def old(settings, tmp_path):
    folder = tmp_path / "old"
    folder.mkdir()
    write(folder, "001_old_style.py", OLD_STYLE)
    return settings.model_copy(update={"migrations_dir": folder})


def columns(url: str, table: str) -> list[tuple]:
    return query(url, "SELECT column_name, data_type, character_maximum_length, is_nullable FROM "
                      "information_schema.columns WHERE table_name = %s ORDER BY ordinal_position", (table,))


def test_a_1_6_era_file_applies_with_its_flushes_and_data_in_order(target, old, db_url):
    apply_pending(target, old)
    assert query(db_url, "SELECT sid, name, title FROM sub") == [("s1", "renamed", "renamed")]
    assert query(db_url, "SELECT indexdef FROM pg_indexes WHERE indexname = 'wiki_sid_slug'") == [
        ("CREATE UNIQUE INDEX wiki_sid_slug ON public.wiki USING btree (sid, slug)",)]


def test_later_files_replay_the_old_ones_and_name_tables_as_strings(target, old, db_url):
    apply_pending(target, old)
    write(old.migrations_dir, "002_later.py", LATER)
    apply_pending(target, old)  # replays 001: its writes are held back
    assert [c[0] for c in columns(db_url, "sub")] == ["sid", "name", "heading"]
    assert ("slug", "character varying", 80, "NO") in columns(db_url, "wiki")
    assert query(db_url, "SELECT count(*) FROM sub") == [(1,)]
    rollback_last(target, old, count=2)
    assert query(db_url, "SELECT to_regclass('sub')") == [(None,)]
