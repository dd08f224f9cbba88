"""The `migrate` flow as a developer and an approver see it: final states, artifacts, the database."""

from __future__ import annotations

import shutil
import subprocess
import textwrap

import pytest
from flowruns import (
    applied,
    artifacts,
    final_state,
    run_in_background,
    use_models_ahead,
    wait_for_pause,
)
from helpers import REAL_CORPUS, apply_pending, needs_real_corpus, query, rollback_last, schema_dump
from prefect import flow
from prefect.flow_runs import resume_flow_run

from dbcore.backup.dump import list_backups
from dbcore.connection import Env, Target
from dbcore.deploy.recovery import schema_snapshot
from dbcore.deploy.run import DeployRun, RunOptions
from dbcore.deploy.steps import ApprovedChange
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import plan_apply
from flows.migrate import migrate
from flows.rollback import rollback_after_failed_apply


def test_local_run_backs_up_rehearses_and_applies(flow_env, db_url):
    state = migrate(return_state=True)
    assert state.is_completed(), state.message
    assert state.message == ("applied 4: 001_initial_schema, 002_add_document_metadata, "
                             "003_add_project_slug, 004_fix_sourcedir_language")
    assert applied(db_url)[-1] == "004_fix_sourcedir_language"
    backups = list_backups(flow_env)
    assert len(backups) == 1 and backups[0].last_migration == "none"
    plan = artifacts(state.state_details.flow_run_id)["migration-plan"]
    assert "004_fix_sourcedir_language" in plan and backups[0].key in plan
    assert "Rehearsal on a copy passed" in plan and "CREATE TABLE" in plan
    # the scratch copy is gone
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname LIKE '%rehearsal%'") == [(0,)]

    again = migrate(return_state=True)
    assert again.is_completed() and again.message == "up to date"


def test_dry_run_changes_nothing_and_shows_the_plan(flow_env, db_url):
    before = schema_dump(db_url)
    state = migrate(dry_run=True, return_state=True)
    assert state.is_completed()
    assert state.message.startswith("dry run: would apply 4") and "nothing changed" in state.message
    assert schema_dump(db_url) == before
    assert "migration-plan" in artifacts(state.state_details.flow_run_id)


def test_a_lint_error_stops_before_anything_runs(flow_env, db_url, migrations_dir):
    (migrations_dir / "005_raw.py").write_text(textwrap.dedent("""\
        def migrate(migrator, database, *, fake=False):
            database.execute_sql("ALTER TABLE project ADD COLUMN x int")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project DROP COLUMN x")
        """))
    state = migrate(return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at lint, nothing changed")
    assert "005_raw.py" in state.message and "execute_sql" in state.message
    assert applied(db_url) == [] and list_backups(flow_env) == []


def test_wrong_env_fails_the_run_with_the_fix(flow_env, db_url):
    state = migrate(env="production", return_state=True)
    assert state.is_failed()
    assert "--env production contradicts the environment" in state.message
    assert applied(db_url) == []


def test_failed_post_checks_roll_back_by_the_rollback_functions(flow_env, db_url, monkeypatch,
                                                                tmp_path):
    apply_pending(Target(Env.LOCAL, db_url), flow_env, upto="003")
    before = schema_dump(db_url)
    use_models_ahead(monkeypatch, tmp_path)  # the post-checks must fail
    state = migrate(backup=False, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed after apply at post-checks")
    assert "rolled back by rollback functions (004_fix_sourcedir_language)" in state.message
    assert schema_dump(db_url) == before
    assert applied(db_url)[-1] == "003_add_project_slug"


def test_the_rollback_subflow_restores_the_backup_when_rollback_functions_fail(
        flow_env, db_url, migrations_dir):
    target = Target(Env.LOCAL, db_url)
    apply_pending(target, flow_env, upto="003")
    query(db_url, "INSERT INTO project (name, created_at, updated_at) VALUES ('kept', now(), now())")
    admin_url = db_url.rsplit("/", 1)[0] + "/postgres"
    query(admin_url, f'ALTER DATABASE "{target.dbname}" SET statement_timeout = \'7s\'')
    from dbcore.backup.dump import backup_to_s3

    backup = backup_to_s3(target, flow_env)
    before = schema_snapshot(target)
    path = migrations_dir / "004_fix_sourcedir_language.py"
    path.write_text(path.read_text().replace(
        'migrator.sql(\'DROP INDEX IF EXISTS "sourcedir_project_id_path_language"\')',
        'migrator.sql("SELECT * FROM no_such_table")'))
    apply_pending(target, flow_env)

    @flow
    def after_a_failed_apply():
        run = DeployRun(target, flow_env, "abcdef123456", RunOptions(approval_timeout=60))
        approved = ApprovedChange(plan_apply(target, flow_env), None, backup.key, None, before, None,
                                  ApprovalRecord(None, None, "f" * 16))
        return rollback_after_failed_apply(run, ["004_fix_sourcedir_language"], approved)

    how = after_a_failed_apply()
    assert how.startswith(f"restoring backup {backup.key}")
    assert schema_snapshot(target) == before
    assert query(db_url, "SELECT name FROM project") == [("kept",)]
    assert query(db_url, "SHOW statement_timeout") == [("7s",)]  # the database's own settings too
    kept = query(db_url, "SELECT datname FROM pg_database WHERE datname LIKE %s",
                 (target.dbname + "_failed_%",))
    assert len(kept) == 1  # the broken database is kept for inspection
    query(db_url.rsplit("/", 1)[0] + "/postgres", f'DROP DATABASE "{kept[0][0]}"')


def test_an_approved_run_applies_and_records_the_approver(flow_env, db_url):
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    assert applied(db_url) == []  # nothing before the approval
    assert "migration-plan" in artifacts(paused.id)
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada", "comment": "ok"})
    state = final_state(thread, result)
    assert state.is_completed() and state.message.startswith("applied 4")
    actors = query(db_url, "SELECT DISTINCT actor FROM migration_audit")
    assert actors == [("Ada",)]


def test_a_rejected_run_changes_nothing(flow_env, db_url):
    before = schema_dump(db_url)
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "Bob",
                                          "comment": "not on a Friday"})
    state = final_state(thread, result)
    assert state.is_failed()
    assert state.message == "rejected by Bob: not on a Friday, nothing changed"
    assert schema_dump(db_url) == before


def test_an_unanswered_approval_times_out_as_rejected(flow_env, db_url):
    state = migrate(require_approval=True, approval_timeout_seconds=3, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("rejected (no answer within 3s)")
    assert applied(db_url) == []


def test_proxy_dry_run_goes_through_the_tunnel_and_closes_it(flow_env, db_url, monkeypatch,
                                                             pg_server_url, tmp_path):
    import shlex
    import sys
    from pathlib import Path
    from urllib.parse import urlsplit

    server = urlsplit(pg_server_url)
    forwarder = Path(__file__).resolve().parent.parent / "tcp_forwarder.py"
    monkeypatch.setenv("USE_FLY_POSTGRES_FROM_LOCAL_PROXY", "1")
    monkeypatch.setenv("MIGRATE_PROXY_COMMAND", f"{shlex.quote(sys.executable)} "
                       f"{shlex.quote(str(forwarder))} {{local_port}} {server.hostname} {server.port}")
    monkeypatch.setenv("MIGRATE_PROXY_LOCAL_PORT", "0")
    # As Fly names it: only the tunnel's local end can reach it.
    monkeypatch.setenv("DATABASE_URL", f"postgres://postgres:pw@my-db.flycast:5432{urlsplit(db_url).path}")
    # the rehearsal runs on the laptop's embedded cluster, started here for the run
    monkeypatch.setenv("MIGRATE_LOCAL_DIR", str(tmp_path / ".local"))
    before = schema_dump(db_url)
    try:
        state = migrate(env="proxy", dry_run=True, return_state=True)
    finally:
        import shutil

        from dbcore.services.local import down, local_postgres_root
        from dbcore.settings import Settings

        laptop = Settings(local_dir=tmp_path / ".local")
        down(laptop)
        shutil.rmtree(local_postgres_root(laptop).parent, ignore_errors=True)  # /var/tmp/dbmigrate-* as root
    assert state.is_completed(), state.message
    assert state.message.startswith("dry run: would apply 4")
    plan = artifacts(state.state_details.flow_run_id)["migration-plan"]
    assert "on the embedded local cluster" in plan and "not through the tunnel" in plan
    assert schema_dump(db_url) == before
    backup = list_backups(flow_env)[0]
    assert backup.env == "proxy"
    import subprocess

    left = subprocess.run(["pgrep", "-f", str(forwarder)], capture_output=True, text=True).stdout
    assert left.strip() == ""  # the tunnel was closed


def test_a_busy_migration_lock_stops_the_run_at_preflight_with_nothing_changed(flow_env, db_url,
                                                                               monkeypatch):
    # (a lock taken between the preflight and the apply: MigrationLockTimeout, tests/dbcore)
    import psycopg2

    from dbcore.settings import Settings

    monkeypatch.setenv("MIGRATE_PREFLIGHT_WAIT", "1")
    holder = psycopg2.connect(db_url, application_name="dbmigrate lock: apply by ci")
    holder.autocommit = True  # another deploy, holding the migration lock
    holder.cursor().execute("SELECT pg_advisory_lock(%s)", (Settings().advisory_lock_key,))
    try:
        before = schema_dump(db_url)
        state = migrate(return_state=True)
        pid = holder.get_backend_pid()
    finally:
        holder.close()
    assert state.is_failed()
    assert state.message.startswith("failed at preflight, nothing changed: 1 session(s) would "
                                    "block the migration")
    assert f"pid {pid} (dbmigrate lock: apply by ci, holds the migration lock since" in state.message
    assert "another migration run" in state.message
    assert list_backups(flow_env) == []  # stopped before the backup
    assert schema_dump(db_url) == before
    # no restore was attempted on this database (other tests' restores share the server)
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname LIKE %s",
                 (db_url.rsplit("/", 1)[1] + "%failed%",)) == [(0,)]


def test_an_approval_without_a_name_is_refused_and_the_run_keeps_waiting(flow_env, db_url):
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    with pytest.raises(RuntimeError, match="Cannot resume this run"):
        resume_flow_run(paused.id, run_input={"approve": True})
    assert applied(db_url) == []
    resume_flow_run(paused.id, run_input={"approve": False, "approver": "Ada"})
    assert final_state(thread, result).message == "rejected by Ada, nothing changed"


def test_production_cannot_switch_the_approval_off(flow_env, db_url, monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "myapp")
    state = migrate(require_approval=False, return_state=True)
    assert state.is_failed() and "production always needs an approval" in state.message
    assert applied(db_url) == []


@needs_real_corpus
def test_a_project_migrated_by_pw_migrate_1_6_takes_a_new_migration_through_the_flow(
        flow_env, db_url, tmp_path, monkeypatch):
    """The 46-file throat project (tests/fixtures/REAL_CORPUS.md), its history written by pw_migrate 1.6.6."""
    real = REAL_CORPUS / "throat"
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", db_url, "-f",
                    str(real / "pw_migrate_dump.sql")], check=True, capture_output=True)
    folder = tmp_path / "throat"
    shutil.copytree(real / "migrations", folder)
    (folder / "047_add_column.py").write_text(textwrap.dedent('''\
        import peewee as pw


        def migrate(migrator, database, *, fake=False):
            migrator.add_fields("user", dm_note=pw.TextField(null=True))


        def rollback(migrator, database, *, fake=False):
            migrator.remove_fields("user", "dm_note")
        '''))
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(folder))
    monkeypatch.delenv("MIGRATE_MODELS")  # the app's own models are not ours to compare with
    monkeypatch.syspath_prepend(str(real / "stubs"))  # the modules its migrations import
    rows = "SELECT (SELECT count(*) FROM sub), (SELECT count(*) FROM sub_metadata), (SELECT count(*) FROM badge)"
    before = query(db_url, rows)

    state = migrate(return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "applied 1: 047_add_column"
    plan = artifacts(state.state_details.flow_run_id)["migration-plan"]
    assert "MIGRATE_MODELS is not set" in plan  # no drift compare against the sample app
    assert query(db_url, rows) == before  # the replays (rehearsal and apply) wrote nothing
    cfg = flow_env.model_copy(update={"migrations_dir": folder})
    assert rollback_last(Target(Env.LOCAL, db_url), cfg).names == ["047_add_column"]
    assert applied(db_url)[-1] == "046_email_forwarded_notifications"


def test_a_terminal_run_takes_over_its_head_start_one_backup_stored(flow_env, db_url, capsys):
    from flows.migrate import main

    assert main(["--env", "local"]) == 0
    assert "migrate: applied 4" in capsys.readouterr().out
    assert applied(db_url)[-1] == "004_fix_sourcedir_language"
    assert len(list_backups(flow_env)) == 1  # begun before Prefect started, taken over by the flow
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname LIKE '%rehearsal%'") == [(0,)]


PHASED = '''\
import peewee as pw


def migrate(migrator, database, *, fake=False):
    migrator.add_index("document", "filename")
    migrator.add_constraint("project", "project_name_short", pw.SQL("CHECK (length(name) < 50)"))


def rollback(migrator, database, *, fake=False):
    migrator.drop_constraints("project", "project_name_short")
    migrator.drop_index("document", "filename")
'''


def test_a_run_stopped_after_the_batch_s_commit_is_continued_by_the_next_approved_run(
        flow_env, db_url, migrations_dir, monkeypatch):
    """Phases through the flow: the index is built after the batch's commit (phase 2), the CHECK
    validated after it (phase 4). A row written while the run waited for its approval fails the
    validation: the run ends Failed naming phase 4, nothing rolled back (what committed is valid),
    and the next run, approved again, continues from there."""
    monkeypatch.delenv("MIGRATE_MODELS")  # the sample app's models know nothing of the new index
    assert migrate(return_state=True).is_completed()
    (migrations_dir / "005_phased.py").write_text(PHASED)

    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    assert "CREATE INDEX CONCURRENTLY" in artifacts(paused.id)["migration-plan"]
    query(db_url, "INSERT INTO project (created_at, updated_at, name) VALUES (now(), now(), %s)", ("x" * 60,))
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada"})
    state = final_state(thread, result)
    assert state.is_failed()
    assert state.message.startswith("applied; stopped in phase 4, after the batch's commit: phase 4 "
                                    "(validation) of 005_phased: validate project_name_short on project")
    assert applied(db_url)[-1] == "005_phased"  # not rolled back: the schema is valid as it is
    assert query(db_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'document_filename'::regclass") \
        == [(True,)]
    assert query(db_url, "SELECT convalidated FROM pg_constraint WHERE conname = 'project_name_short'") \
        == [(False,)]
    assert query(db_url, "SELECT action FROM migration_audit WHERE name = '005_phased' ORDER BY id") \
        == [("apply",), ("phase 2",)]

    query(db_url, "UPDATE project SET name = 'short' WHERE length(name) >= 50")
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)  # a continuation is a change to a live database: approved again
    assert "project_name_short" in artifacts(paused.id)["migration-plan"]
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada"})
    state = final_state(thread, result)
    assert state.is_completed(), state.message
    assert state.message == "continued an earlier apply: reached phase 4 (validation): 1 step(s) after the batch done"
    assert query(db_url, "SELECT convalidated FROM pg_constraint WHERE conname = 'project_name_short'") \
        == [(True,)]

    (migrations_dir / "006_more.py").write_text(
        "def migrate(migrator, database, *, fake=False):\n    migrator.add_index('sourcedir', 'path')\n\n\n"
        "def rollback(migrator, database, *, fake=False):\n    migrator.drop_index('sourcedir', 'path')\n")
    state = migrate(return_state=True)
    assert state.is_completed(), state.message
    assert state.message == ("applied 1: 006_more; reached phase 2 (concurrent index builds and drops): "
                             "1 step(s) after the batch done")
