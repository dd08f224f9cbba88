"""status / new / apply / rollback against a real PostgreSQL: what a user of `dbmigrate` sees."""

from __future__ import annotations

import textwrap
import threading
from pathlib import Path

import psycopg2
import pytest
from helpers import apply_pending, query, rollback_last, schema_dump, wait_until

from dbcore.connection import connect
from dbcore.errors import (
    MigrationFailed,
    MigrationFileError,
    MigrationLockTimeout,
    NonAtomicFailed,
    NothingToRollback,
    PlanOutdated,
    TableLockTimeout,
    TransactionBroken,
)
from dbcore.migrate.files import new_migration, status
from dbcore.migrate.history import read_audit
from dbcore.migrate.plan import plan_apply
from dbcore.migrate.runner import execute

APP_TABLES = {"project", "sourcedir", "document"}


def write(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(body))
    return path


def tables(url: str) -> set[str]:
    rows = query(url, "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r[0] for r in rows}


def applied_names(url: str) -> list[str]:
    if "migratehistory" not in tables(url):
        return []
    return [r[0] for r in query(url, "SELECT name FROM migratehistory ORDER BY id")]


#: 1 when the session named %s holds an advisory lock on this database
HOLDS_LOCK = """
SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND a.application_name = %s
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


@pytest.fixture
def cfg(settings, migrations_dir):
    return settings.model_copy(update={"migrations_dir": migrations_dir})


def status_of(target, cfg):
    db = connect(target)
    try:
        return {s.name: s for s in status(db, cfg.migrations_dir)}
    finally:
        db.close()


def test_sample_migrations_apply_then_roll_back_to_an_empty_schema(target, cfg, db_url):
    report = apply_pending(target, cfg, actor="alice", run_id="run-1")
    assert report.names == ["001_initial_schema", "002_add_document_metadata",
                            "003_add_project_slug", "004_fix_sourcedir_language"]
    assert APP_TABLES <= tables(db_url)
    columns = query(db_url, "SELECT is_nullable, column_default FROM information_schema.columns "
                            "WHERE table_name = 'sourcedir' AND column_name = 'language'")
    assert columns == [("NO", None)]  # the guide's three steps: required, no default left
    assert all(r.sql for r in report.results)  # the SQL of each migration was captured

    rollback = rollback_last(target, cfg, count=4)
    assert rollback.names == list(reversed(report.names))
    assert tables(db_url) & APP_TABLES == set()
    assert applied_names(db_url) == []

    db = connect(target)
    audit = read_audit(db)
    db.close()
    assert [(a["name"], a["action"]) for a in audit[:2]] == [
        ("001_initial_schema", "rollback"), ("002_add_document_metadata", "rollback")]
    applies = [a for a in audit if a["action"] == "apply"]
    assert {a["actor"] for a in applies} == {"alice"} and {a["run_id"] for a in applies} == {"run-1"}
    assert all(len(a["checksum"]) == 64 for a in audit)


def test_status_new_apply_round_trip(target, cfg):
    assert all(not s.applied for s in status_of(target, cfg).values())
    path = new_migration(cfg.migrations_dir, "add user email")
    assert path.name == "005_add_user_email.py"
    body = path.read_text()
    assert "def migrate(" in body and "def rollback(" in body and "class BaseModel" in body

    # A fresh template refuses to run rather than silently doing nothing.
    with pytest.raises(MigrationFailed, match="005_add_user_email"):
        apply_pending(target, cfg)
    assert all(not s.applied for s in status_of(target, cfg).values())

    apply_pending(target, cfg, upto="004")
    rows = status_of(target, cfg)
    assert [n for n, s in rows.items() if s.applied] == [
        "001_initial_schema", "002_add_document_metadata", "003_add_project_slug",
        "004_fix_sourcedir_language"]
    assert not rows["005_add_user_email"].applied
    assert rows["001_initial_schema"].applied_at is not None


def test_a_failure_in_the_middle_of_a_batch_leaves_the_database_exactly_as_before(
        target, cfg, db_url):
    apply_pending(target, cfg, upto="002")
    before = schema_dump(db_url)
    query(db_url, "INSERT INTO project (name, created_at, updated_at) VALUES ('p', now(), now())")
    write(cfg.migrations_dir, "005_fails.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project ADD COLUMN extra integer")
            migrator.sql("SELECT * FROM no_such_table")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project DROP COLUMN extra")
        """)
    with pytest.raises(MigrationFailed) as info:
        apply_pending(target, cfg)
    message = str(info.value)
    assert "005_fails" in message and "no_such_table" in message and "nothing was changed" in message
    assert not isinstance(info.value, TableLockTimeout)
    assert schema_dump(db_url) == before  # 003 and 004 ran before 005 and were undone too
    assert applied_names(db_url) == ["001_initial_schema", "002_add_document_metadata"]
    assert query(db_url, "SELECT count(*) FROM project") == [(1,)]


def test_a_syntax_error_names_the_file_and_line_and_applies_nothing(target, cfg, db_url):
    write(cfg.migrations_dir, "005_broken.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("SELECT 1"
        """)
    with pytest.raises(MigrationFileError) as info:
        apply_pending(target, cfg)
    assert "005_broken.py" in str(info.value) and "line" in str(info.value)
    assert applied_names(db_url) == [] and not tables(db_url) & APP_TABLES


def test_status_reports_a_file_changed_since_it_was_applied(target, cfg):
    apply_pending(target, cfg)
    path = cfg.migrations_dir / "003_add_project_slug.py"
    path.write_text(path.read_text() + "\n# edited after it was applied\n")
    rows = status_of(target, cfg)
    assert rows["003_add_project_slug"].changed
    assert not rows["002_add_document_metadata"].changed


def test_status_reports_an_applied_migration_whose_file_is_gone(target, cfg):
    apply_pending(target, cfg)
    (cfg.migrations_dir / "004_fix_sourcedir_language.py").unlink()
    assert status_of(target, cfg)["004_fix_sourcedir_language"].file_missing


def test_a_missing_migrations_folder_is_an_error_not_a_new_folder(target, settings, tmp_path):
    cfg = settings.model_copy(update={"migrations_dir": tmp_path / "migrashuns"})
    with pytest.raises(Exception, match="migrashuns does not exist"):
        apply_pending(target, cfg)
    assert not (tmp_path / "migrashuns").exists()


def test_two_concurrent_applies_one_applies_the_other_times_out_on_the_lock(target, cfg, db_url,
                                                                           tmp_path):
    gate = tmp_path / "gate"  # the first apply holds the lock until the test opens it
    write(cfg.migrations_dir, "005_slow.py", f"""\
        import pathlib
        import time

        def migrate(migrator, database, *, fake=False):
            deadline = time.monotonic() + 60
            while not fake and not pathlib.Path({str(gate)!r}).exists() and time.monotonic() < deadline:
                time.sleep(0.05)

        def rollback(migrator, database, *, fake=False):
            pass
        """)
    outcome: dict[str, object] = {}

    def first():
        try:
            outcome["first"] = apply_pending(target, cfg, actor="first")
        except Exception as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=first)
    thread.start()
    try:
        wait_until(lambda: query(db_url, HOLDS_LOCK, ("dbmigrate lock: apply by first",)) == [(1,)],
                   "the first apply to hold the migration lock", timeout=60,
                   gave_up=lambda: not thread.is_alive(), log=lambda: repr(outcome))
        impatient = cfg.model_copy(update={"advisory_lock_wait": 0.5})
        with pytest.raises(MigrationLockTimeout) as info:
            apply_pending(target, impatient, actor="second")
    finally:
        gate.touch()
        thread.join(60)
    message = str(info.value)
    assert "pid" in message and "dbmigrate lock: apply by first" in message
    assert info.value.retryable
    assert "first" in outcome, outcome  # the first one, let go, applied everything
    assert len(outcome["first"].names) == 5
    assert len(applied_names(db_url)) == 5


def test_two_concurrent_applies_the_patient_one_finds_nothing_to_do(target, cfg, db_url):
    write(cfg.migrations_dir, "005_slow.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("SELECT pg_sleep(1.5)")

        def rollback(migrator, database, *, fake=False):
            pass
        """)
    plans = [plan_apply(target, cfg), plan_apply(target, cfg)]  # both saw 5 pending
    patient = cfg.model_copy(update={"advisory_lock_wait": 30})
    reports = [None, None]

    def run(i):
        reports[i] = execute(plans[i], target, patient)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(len(r.names) for r in reports) == [0, 5]
    assert "up to date" in next(r for r in reports if not r.names).summary()
    assert len(applied_names(db_url)) == 5


def test_a_busy_table_makes_apply_give_up_quickly_and_change_nothing(target, cfg, db_url):
    apply_pending(target, cfg, upto="004")
    before = schema_dump(db_url)
    write(cfg.migrations_dir, "005_add_column.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project ADD COLUMN extra integer")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project DROP COLUMN extra")
        """)
    app = psycopg2.connect(db_url)  # the live application, in a long transaction on project
    try:
        with app.cursor() as cur:
            cur.execute("SELECT count(*) FROM project")
        # the application never lets go: only lock_timeout can end the wait
        with pytest.raises(TableLockTimeout) as info:
            apply_pending(target, cfg)
        assert info.value.retryable and "lock_timeout=1s" in str(info.value)
    finally:
        app.close()
    assert schema_dump(db_url) == before
    assert apply_pending(target, cfg).names == ["005_add_column"]  # the retry goes through


def test_an_atomic_false_migration_runs_alone_outside_the_transaction(target, cfg, db_url):
    write(cfg.migrations_dir, "005_index_concurrently.py", """\
        atomic = False

        def migrate(migrator, database, *, fake=False):
            migrator.sql("CREATE INDEX CONCURRENTLY IF NOT EXISTS document_filename "
                         "ON document (filename)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP INDEX CONCURRENTLY IF EXISTS document_filename")
        """)
    write(cfg.migrations_dir, "006_after.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE document ADD COLUMN lines integer")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE document DROP COLUMN lines")
        """)
    plan = plan_apply(target, cfg)
    assert [(p.kind, [m.name[:3] for m in p.migrations]) for p in plan.phases] == [
        ("batch", ["001", "002", "003", "004"]), ("alone", ["005"]), ("batch", ["006"])]
    report = execute(plan, target, cfg)
    assert len(report.names) == 6
    assert query(db_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = "
                         "'document_filename'::regclass") == [(True,)]
    rollback_last(target, cfg, count=2)
    assert query(db_url, "SELECT to_regclass('document_filename')") == [(None,)]


def test_dry_run_shows_the_sql_and_changes_nothing(target, cfg, db_url):
    before = schema_dump(db_url)
    report = apply_pending(target, cfg, dry_run=True)
    assert report.dry_run and len(report.names) == 4
    assert any("CREATE TABLE" in s for s in report.results[0].sql)
    assert schema_dump(db_url) == before


def test_rollback_of_more_than_applied_is_refused(target, cfg, db_url):
    apply_pending(target, cfg, upto="001")
    with pytest.raises(NothingToRollback, match="only 1"):
        rollback_last(target, cfg, count=2)
    assert applied_names(db_url) == ["001_initial_schema"]


def test_a_plan_made_before_another_run_changed_history_is_refused(target, cfg):
    plan = plan_apply(target, cfg, upto="002")
    apply_pending(target, cfg, upto="001")
    path = cfg.migrations_dir / "002_add_document_metadata.py"
    path.write_text(path.read_text() + "\n")
    with pytest.raises(PlanOutdated):
        execute(plan, target, cfg)


def test_the_guide_three_steps_do_not_rewrite_the_table(target, cfg):
    report = apply_pending(target, cfg)
    sql = report.results[3].sql
    assert sql[0] == """ALTER TABLE "sourcedir" ADD COLUMN "language" VARCHAR(2) DEFAULT 'el'"""
    assert not any(s.startswith("UPDATE") and "WHERE" not in s for s in sql)


def test_a_failing_first_apply_leaves_no_trace(target, cfg, db_url):
    before = schema_dump(db_url)
    write(cfg.migrations_dir, "005_fails.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("SELECT 1/0")

        def rollback(migrator, database, *, fake=False):
            pass
        """)
    with pytest.raises(MigrationFailed, match="division by zero"):
        apply_pending(target, cfg)
    assert schema_dump(db_url) == before  # not even migratehistory / migration_audit


def test_a_rollback_failing_in_the_middle_changes_nothing(target, cfg, db_url):
    apply_pending(target, cfg)
    before = schema_dump(db_url)
    path = cfg.migrations_dir / "003_add_project_slug.py"
    path.write_text(path.read_text().replace(
        "migrator.sql('DROP INDEX IF EXISTS \"project_slug\"')", "migrator.sql('SELECT 1/0')"))
    with pytest.raises(MigrationFailed, match="rollback of 003_add_project_slug failed"):
        rollback_last(target, cfg, count=3)  # 004 was undone first, then 003 failed
    assert schema_dump(db_url) == before
    assert len(applied_names(db_url)) == 4


def test_a_migration_that_commits_is_caught_and_named(target, cfg, db_url):
    write(cfg.migrations_dir, "005_commits.py", """\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("COMMIT")

        def rollback(migrator, database, *, fake=False):
            pass
        """)
    with pytest.raises(TransactionBroken) as info:
        apply_pending(target, cfg)
    assert "005_commits.py ended the batch transaction" in str(info.value)
    assert "NOT as before" in str(info.value)
    assert info.value.committed[-1] == "005_commits"


def test_a_failed_concurrent_index_is_reported_with_its_invalid_index(target, cfg, db_url):
    apply_pending(target, cfg)
    query(db_url, "INSERT INTO project (name, created_at, updated_at) VALUES ('a', now(), now()), "
                  "('b', now(), now())")
    write(cfg.migrations_dir, "005_unique_concurrently.py", """\
        atomic = False

        def migrate(migrator, database, *, fake=False):
            migrator.sql("CREATE UNIQUE INDEX CONCURRENTLY project_created ON project (created_at)")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("DROP INDEX CONCURRENTLY IF EXISTS project_created")
        """)
    query(db_url, "UPDATE project SET created_at = '2026-01-01'")  # duplicates: the build fails
    with pytest.raises(NonAtomicFailed) as info:
        apply_pending(target, cfg)
    message = str(info.value)
    assert "INVALID index(es) project_created" in message and "DROP INDEX CONCURRENTLY" in message
    assert not info.value.retryable
    assert "005_unique_concurrently" not in applied_names(db_url)


def test_status_still_works_when_a_file_is_broken(target, cfg):
    write(cfg.migrations_dir, "005_broken.py", "def migrate(:\n")
    rows = status_of(target, cfg)
    assert "syntax error at line 1" in rows["005_broken"].error
    assert rows["004_fix_sourcedir_language"].error is None


def test_an_audit_table_of_an_older_release_gets_the_approval_columns(target, settings, db_url,
                                                                     migrations_dir):
    from dbcore.migrate.history import ApprovalRecord

    query(db_url, "CREATE TABLE migration_audit (id bigserial PRIMARY KEY, name text NOT NULL, "
                  "action text NOT NULL, checksum text, at timestamptz NOT NULL DEFAULT now(), "
                  "actor text NOT NULL, run_id text, duration_ms integer)")
    query(db_url, "INSERT INTO migration_audit (name, action, actor) VALUES ('000_old', 'apply', 'Bob')")
    cfg = settings.model_copy(update={"migrations_dir": migrations_dir})
    db = connect(target)
    try:
        old = read_audit(db)  # reading never writes: the columns are not there yet, and read as empty
        assert [(r["name"], r["approver"], r["fingerprint"]) for r in old] == [("000_old", None, None)]
        assert query(db_url, "SELECT count(*) FROM information_schema.columns WHERE "
                             "table_name = 'migration_audit' AND column_name = 'approver'") == [(0,)]
    finally:
        db.close()
    execute(plan_apply(target, cfg, upto="001"), target, cfg, actor="Ada", run_id="run-1",
            approval=ApprovalRecord("Ada", "looks right", "0123456789abcdef"))
    assert query(db_url, "SELECT name, actor, approver, comment, fingerprint, run_id FROM "
                         "migration_audit ORDER BY id") == [
        ("000_old", "Bob", None, None, None, None),
        ("001_initial_schema", "Ada", "Ada", "looks right", "0123456789abcdef", "run-1")]
