"""The replay of applied migrations sends nothing, in any thread, and only runs when needed."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import apply_pending, query, rollback_last
from test_migrations import write

from dbcore.connection import connect
from dbcore.errors import MigrationFileError
from dbcore.migrate.router import FileRouter

# peewee-migrate's own tests/migrations 001 and 002 (002 writes through migrator.orm)
PEOPLE = """\
    import datetime as dt
    import peewee as pw

    def migrate(migrator, database, **kwargs):
        @migrator.create_model
        class Tag(pw.Model):
            tag = pw.CharField()

        @migrator.create_model
        class Person(pw.Model):
            first_name = pw.CharField()
            last_name = pw.CharField(index=True)
            dob = pw.DateField(null=True)
            birthday = pw.DateField(default=dt.datetime.now)
            email = pw.CharField(index=True, unique=True)

    def rollback(migrator, database, **kwargs):
        migrator.remove_model("person")
        migrator.remove_model("tag")
    """
WRITES = """\
    import peewee as pw

    def migrate(migrator, database, **kwargs):
        migrator.add_fields("tag", created_at=pw.DateTimeField(null=True))
        migrator.add_index("person", "first_name", unique=True)
        Person = migrator.orm["person"]
        Person.create(first_name="test3", last_name="test3", email="test3@google.com")
        # every other way a migration's code reaches the database, none of them checking `fake`
        database.execute_sql("INSERT INTO tag (tag) VALUES ('direct')")
        with database.atomic():
            migrator.orm["tag"].update(tag="changed").execute()
        migrator.sql("INSERT INTO tag (tag) VALUES ('queued')")
        migrator.run(lambda: database.execute_sql("DELETE FROM person"))
        migrator.python(lambda: migrator.orm["tag"].delete().execute())
    """
RENAME = """\
    import peewee as pw

    def migrate(migrator, database, **kwargs):
        migrator.rename_field("tag", "created_at", "updated_at")
        migrator.add_fields("person", is_deleted=pw.BooleanField(default=False))

    def rollback(migrator, database, **kwargs):
        migrator.rename_field("tag", "updated_at", "created_at")
        migrator.remove_fields("person", "is_deleted")
    """
RAW_SQL = """\
    def migrate(migrator, database, *, fake=False):
        migrator.sql("ALTER TABLE tag ADD COLUMN note text")

    def rollback(migrator, database, *, fake=False):
        migrator.sql("ALTER TABLE tag DROP COLUMN note")
    """


@pytest.fixture
def people(settings, tmp_path):
    folder = tmp_path / "people"
    folder.mkdir()
    write(folder, "001_people.py", PEOPLE)
    write(folder, "002_writes.py", WRITES)
    return settings.model_copy(update={"migrations_dir": folder})


def writes(url: str) -> tuple:
    """Rows of the app's tables, and what pg_stat_user_tables counted written to them."""
    query(url, "SELECT pg_stat_force_next_flush()")
    stats = query(url, "SELECT relname, n_tup_ins, n_tup_upd, n_tup_del FROM pg_stat_user_tables "
                       "WHERE relname IN ('person', 'tag') ORDER BY 1")
    rows = query(url, "SELECT (SELECT count(*) FROM person), (SELECT count(*) FROM tag)")
    return rows, stats


def test_replaying_a_migration_that_writes_through_the_orm_writes_nothing(target, people, db_url):
    apply_pending(target, people)
    before = writes(db_url)
    assert before[0] == [(0, 0)]  # 002 ran for real once: inserted, then its queue deleted

    write(people.migrations_dir, "003_rename.py", RENAME)
    report = apply_pending(target, people)  # replays 001 and 002: the unique email is not hit
    assert report.names == ["003_rename"]
    rollback_last(target, people)  # replays 001-003: the NOT NULL rename is not hit either
    assert writes(db_url) == before  # no row written, updated or deleted by the replays


def test_a_raw_sql_plan_replays_nothing(target, people, db_url, caplog):
    apply_pending(target, people)
    # an applied file that can no longer be replayed at all
    write(people.migrations_dir, "002_writes.py", "def migrate(migrator, database, **kw):\n"
                                                   "    raise RuntimeError('old API')\n")
    write(people.migrations_dir, "003_note.py", RAW_SQL)
    caplog.set_level("INFO", logger="dbcore.migrate.replay")
    apply_pending(target, people)
    assert "replay" not in caplog.text  # nothing replayed, nothing warned
    assert ("note",) in query(db_url, "SELECT column_name FROM information_schema.columns "
                                      "WHERE table_name = 'tag'")


def test_a_failed_replay_is_named_when_a_pending_migration_needs_its_models(target, people):
    apply_pending(target, people, upto="001")
    query(target.url, "INSERT INTO migratehistory (name, migrated_at) VALUES ('002_writes', now())")
    write(people.migrations_dir, "001_people.py", "def migrate(migrator, database, **kw):\n"
                                                   "    migrator.orm['nothing']\n")
    write(people.migrations_dir, "003_rename.py", RENAME)
    with pytest.raises(MigrationFileError) as info:
        apply_pending(target, people)
    message = str(info.value)
    assert message.startswith("migration 003_rename.py: no model 'tag'")
    assert "replaying applied migration 001_people.py failed: UnknownModel" in message
    assert "replaying applied migration 002_writes.py failed" in message
    assert "nothing was changed" in message


def test_a_replay_in_one_thread_leaves_another_threads_queries_alone(target, people, db_url):
    """Two routers, two threads, one database object: only the replaying thread is held back."""
    apply_pending(target, people, upto="001")
    # a replay that stays in the middle of an applied file until the other thread has written
    write(people.migrations_dir, "002_writes.py", """\
        import time
        import peewee as pw

        def migrate(migrator, database, **kwargs):
            Person = migrator.orm["person"]
            Person.create(first_name="r", last_name="r", email="replay@example.com")
            while not __import__("builtins").__dict__.get("_dbm_other_done"):
                time.sleep(0.01)
        """)
    query(db_url, "INSERT INTO migratehistory (name, migrated_at) VALUES ('002_writes', now())")
    db = connect(target)
    errors = []

    def replaying():
        try:
            with db.connection_context():  # peewee's connections are per thread
                FileRouter(db, people.migrations_dir).migrator.orm["person"]
        except Exception as exc:  # surfaced below
            errors.append(exc)

    thread = threading.Thread(target=replaying)
    thread.start()
    try:
        time.sleep(0.3)  # the replay is now waiting inside 002
        other = FileRouter(db, people.migrations_dir)
        other.database.execute_sql(
            "INSERT INTO person (first_name, last_name, birthday, email) "
            "VALUES ('o', 'o', now(), 'other@example.com')")
    finally:
        __import__("builtins")._dbm_other_done = True
        thread.join(10)
        del __import__("builtins")._dbm_other_done
        db.close()
    assert not errors
    assert query(db_url, "SELECT email FROM person") == [("other@example.com",)]
