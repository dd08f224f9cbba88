"""Code under review before the approval: app code bound to DATABASE_URL reaches only the copy; a
data file changed after the approval is refused; the apply sends only the SQL the rehearsal sent;
a migration that ends its process during the rehearsal fails the run, notified."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
from helpers import apply_pending, query, schema_dump
from prefect.flow_runs import resume_flow_run

from dbcore.connection import Env, Target
from dbcore.errors import MigrationFailed, SqlDiffers
from dbcore.migrate.plan import plan_apply
from dbcore.migrate.retry import apply_retrying
from dbcore.migrate.runner import execute
from dbcore.migrate.sqlcheck import SameSqlAsRehearsed, rehearsed_sql
from flows.migrate import migrate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "flows"))
from flowruns import applied, artifacts, final_state, run_in_background, wait_for_pause  # noqa: E402

APPDB = textwrap.dedent("""\
    \"\"\"The application's database module, as a careless app writes it: bound at import.\"\"\"
    import os

    import peewee
    from playhouse.db_url import connect

    db = connect(os.environ.get("DATABASE_URL") or "postgres://nobody@127.0.0.1:1/nowhere")


    class Project(peewee.Model):
        name = peewee.CharField()

        class Meta:
            database = db
            table_name = "project"
    """)

THROUGH_THE_APP = textwrap.dedent("""\
    \"\"\"005: fix the project names through the application's own model.\"\"\"
    from appdb import Project


    def migrate(migrator, database, *, fake=False):
        Project.update(name="changed by 005").execute()


    def rollback(migrator, database, *, fake=False):
        pass
    """)

READS_A_FILE = textwrap.dedent("""\
    \"\"\"005: its SQL lives in a file beside it.\"\"\"
    from pathlib import Path

    SQL = Path(__file__).parent / "sql" / "005_up.sql"


    def migrate(migrator, database, *, fake=False):
        migrator.sql(SQL.read_text())


    def rollback(migrator, database, *, fake=False):
        migrator.sql("COMMENT ON TABLE project IS NULL")
    """)


@pytest.fixture
def appdb_on_path(tmp_path, monkeypatch):
    """A tiny `appdb` module on PYTHONPATH (and this process's path), as the README's set-up has it."""
    folder = tmp_path / "app"
    folder.mkdir()
    (folder / "appdb.py").write_text(APPDB)
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{__import__('os').environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("appdb", None)


def test_app_code_bound_to_database_url_changes_only_the_copy_before_the_approval(
        flow_env, db_url, migrations_dir, app_at_003, appdb_on_path):
    (migrations_dir / "005_fix_names.py").write_text(THROUGH_THE_APP)
    history = applied(db_url)
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result, timeout=180)
    assert query(db_url, "SELECT name FROM project") == [("kept",)]  # rehearsed: on the copy only
    plan = artifacts(paused.id)["migration-plan"]
    assert "DM011" in plan and "Project.update" in plan  # the approver is told
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "Bob",
                                          "comment": "not through the app"})
    state = final_state(thread, result)
    assert state.is_failed() and state.message.endswith("nothing changed")
    assert query(db_url, "SELECT name FROM project") == [("kept",)]
    assert applied(db_url) == history


def test_a_data_file_changed_after_the_approval_is_not_applied(
        flow_env, db_url, migrations_dir, app_at_003, receiver):
    (migrations_dir / "sql").mkdir()
    (migrations_dir / "sql" / "005_up.sql").write_text("COMMENT ON TABLE project IS 'reviewed'")
    (migrations_dir / "005_note.py").write_text(READS_A_FILE)
    before = schema_dump(db_url)
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result, timeout=180)
    (migrations_dir / "sql" / "005_up.sql").write_text("DELETE FROM project")  # nobody reviewed it
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada", "comment": "ok"})
    state = final_state(thread, result)
    assert state.is_failed()
    assert state.message.startswith("plan changed since it was approved, nothing changed")
    assert "migrations/sql/005_up.sql changed" in state.message
    assert schema_dump(db_url) == before
    assert query(db_url, "SELECT name FROM project") == [("kept",)]


def _rehearsed(target: Target, settings) -> dict:
    """The SQL a rehearsal of the pending plan sends (a dry run here: the same runner)."""
    report = execute(plan_apply(target, settings), target, settings, dry_run=True)
    return rehearsed_sql(report.results)


def test_the_apply_stops_where_its_sql_differs_from_the_rehearsal_with_nothing_changed(
        target, migrations_dir, app_at_003):
    settings = app_at_003
    (migrations_dir / "sql").mkdir()
    (migrations_dir / "sql" / "005_up.sql").write_text("ALTER TABLE project ADD COLUMN note text")
    (migrations_dir / "005_note.py").write_text(READS_A_FILE)
    rehearsed = _rehearsed(target, settings)
    plan = plan_apply(target, settings)
    # changed after the plan was checked, before the apply's COMMIT
    (migrations_dir / "sql" / "005_up.sql").write_text("ALTER TABLE project DROP COLUMN slug")
    before, history = schema_dump(target.url), applied(target.url)
    with pytest.raises(SqlDiffers) as stopped:
        apply_retrying(plan, target, settings, observers=[SameSqlAsRehearsed(rehearsed)])
    message = str(stopped.value)
    assert message.startswith("apply of 005_note sent `ALTER TABLE project DROP COLUMN slug` "
                              "where the rehearsal sent `ALTER TABLE project ADD COLUMN note text`")
    assert "nothing was changed (the whole batch was rolled back)" in message
    assert schema_dump(target.url) == before and applied(target.url) == history


def test_data_statements_may_differ_in_number_and_values_but_not_in_shape(
        target, migrations_dir, app_at_003):
    settings = app_at_003
    (migrations_dir / "005_touch.py").write_text(textwrap.dedent("""\
        def migrate(migrator, database, *, fake=False):
            for (pk,) in database.execute_sql("SELECT id FROM project").fetchall():
                migrator.sql("UPDATE project SET updated_at = now() WHERE id = %s", pk)


        def rollback(migrator, database, *, fake=False):
            pass
        """))
    rehearsed = _rehearsed(target, settings)
    # production moved on: more rows now, so more UPDATEs, with other values
    query(target.url, "INSERT INTO project (name, slug, created_at, updated_at) "
                      "VALUES ('new', 'new', now(), now())")
    report = apply_retrying(plan_apply(target, settings), target, settings,
                            observers=[SameSqlAsRehearsed(rehearsed)])
    assert report.names == ["004_fix_sourcedir_language", "005_touch"]


def test_an_atomic_false_migration_is_stopped_before_the_statement_that_differs(
        target, migrations_dir, app_at_003):
    settings = app_at_003
    apply_pending(target, settings)
    (migrations_dir / "sql").mkdir()
    (migrations_dir / "sql" / "005_up.sql").write_text(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS project_name ON project (name)")
    (migrations_dir / "005_note.py").write_text("atomic = False\n" + READS_A_FILE)
    rehearsed = _rehearsed_for_real(target, settings)
    (migrations_dir / "sql" / "005_up.sql").write_text("DROP TABLE project CASCADE")
    before = schema_dump(target.url)
    with pytest.raises(MigrationFailed) as stopped:  # NonAtomicFailed, naming what stopped it
        apply_retrying(plan_apply(target, settings), target, settings,
                       observers=[SameSqlAsRehearsed(rehearsed)])
    assert "would send `DROP TABLE project CASCADE` where the rehearsal sent `CREATE INDEX" in str(
        stopped.value)
    assert schema_dump(target.url) == before


def _rehearsed_for_real(target: Target, settings) -> dict:
    """An ``atomic = False`` migration is not run by a dry run: rehearse it on a copy database."""
    admin = target.url.rsplit("/", 1)[0] + "/postgres"
    copy = f"{target.dbname}_copy"
    query(admin, f'CREATE DATABASE "{copy}" TEMPLATE "{target.dbname}"')
    try:
        twin = Target(Env.LOCAL, target.url.rsplit("/", 1)[0] + f"/{copy}")
        report = execute(plan_apply(twin, settings), twin, settings)
        return rehearsed_sql(report.results)
    finally:
        query(admin, f'DROP DATABASE "{copy}" WITH (FORCE)')


def test_os_exit_during_the_rehearsal_fails_the_run_naming_the_file_and_notifies(
        flow_env, db_url, migrations_dir, app_at_003, receiver):
    (migrations_dir / "005_exits.py").write_text(textwrap.dedent("""\
        import os


        def migrate(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project ADD COLUMN flag integer")
            os._exit(0)


        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project DROP COLUMN flag")
        """))
    before = schema_dump(db_url)
    state = migrate(require_approval=True, approval_timeout_seconds=60, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at rehearsal, nothing changed: rehearsal on a copy "
                                    "failed, the live database was not touched: apply of 005_exits "
                                    "failed: the process running migrate() of 005_exits.py exited "
                                    "with code 0")
    assert "failed" in receiver.wait_for("005_exits")
    assert schema_dump(db_url) == before
