"""The `migrate` flow under faults and contention: killed mid-apply, three runs at once, an idle
transaction on a table the plan touches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psycopg2
from helpers import REPO, query, schema_dump
from prefect.settings import get_current_settings

from dbcore.backup.dump import list_backups
from flows.migrate import migrate

APPLIED = "SELECT name FROM migratehistory ORDER BY id"
SLOW = textwrap.dedent("""\
    \"\"\"005: slow on purpose: the test kills the flow while it runs.\"\"\"


    def migrate(migrator, database, *, fake=False):
        migrator.sql("UPDATE project SET slug = slug || '-moved'")
        migrator.sql("SELECT pg_sleep(60)")


    def rollback(migrator, database, *, fake=False):
        migrator.sql("UPDATE project SET slug = left(slug, -6)")
    """)


def _wait_for(predicate, what: str, timeout: float = 60.0, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def _advisory_locks(url: str) -> int:
    return query(url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0]


def test_sigkill_of_the_flow_mid_apply_changes_nothing_and_the_next_run_is_clean(
        flow_env, db_url, migrations_dir, app_at_003):
    (migrations_dir / "005_slow.py").write_text(SLOW)
    before, rows = schema_dump(db_url), query(db_url, "SELECT name, slug FROM project")
    history = query(db_url, APPLIED)
    env = {**os.environ, "PREFECT_API_URL": get_current_settings().api.url}
    flow = subprocess.Popen([sys.executable, str(REPO / "flows" / "migrate.py"), "--env", "local",
                             "--no-backup"], env=env, cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _wait_for(lambda: query(db_url, "SELECT pid FROM pg_stat_activity WHERE query LIKE "
                                        "'SELECT pg_sleep(60)%%' AND datname = current_database()"),
                  "the apply to reach 005_slow")
        os.killpg(flow.pid, signal.SIGKILL)
        flow.wait(30)
    finally:
        if flow.poll() is None:
            os.killpg(flow.pid, signal.SIGKILL)
            flow.wait(30)
    # client_connection_check_interval: the server ends the orphaned statement within a second
    _wait_for(lambda: _advisory_locks(db_url) == 0, "the migration lock to be released", 15)
    _wait_for(lambda: not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE query LIKE "
                                        "'SELECT pg_sleep(60)%%'"), "the orphaned statement", 15)
    assert schema_dump(db_url) == before
    assert query(db_url, "SELECT name, slug FROM project") == rows
    assert query(db_url, APPLIED) == history

    (migrations_dir / "005_slow.py").write_text(SLOW.replace("pg_sleep(60)", "pg_sleep(0)"))
    state = migrate(return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "applied 2: 004_fix_sourcedir_language, 005_slow"


def test_three_runs_at_once_one_applies_and_the_others_end_clearly(flow_env, db_url, monkeypatch):
    monkeypatch.setenv("MIGRATE_PREFLIGHT_WAIT", "60")
    monkeypatch.setenv("MIGRATE_ADVISORY_LOCK_WAIT", "60")
    states: list = []
    threads = [threading.Thread(target=lambda: states.append(migrate(return_state=True)))
               for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(240)
    messages = sorted(s.message for s in states)
    assert len(messages) == 3
    applied = [m for m in messages if m.startswith("applied 4")]
    assert len(applied) == 1, messages
    others = [m for m in messages if m not in applied]
    assert all(m == "up to date (another run applied these meanwhile)" or m == "up to date"
               for m in others), messages
    assert [r[0] for r in query(db_url, APPLIED)] == [
        "001_initial_schema", "002_add_document_metadata", "003_add_project_slug",
        "004_fix_sourcedir_language"]
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname LIKE '%%_rehearsal_%%'") \
        == [(0,)]


def test_an_idle_transaction_on_a_touched_table_stops_the_run_at_preflight(
        flow_env, db_url, app_at_003, monkeypatch):
    monkeypatch.setenv("MIGRATE_PREFLIGHT_WAIT", "1")
    monkeypatch.setenv("MIGRATE_PREFLIGHT_IDLE_SECONDS", "0.5")
    before = schema_dump(db_url)
    idle = psycopg2.connect(db_url, application_name="forgotten-shell")
    try:
        idle.cursor().execute("UPDATE sourcedir SET path = 'token-abc123' WHERE id = -1")
        time.sleep(0.7)
        state = migrate(return_state=True)
        pid = idle.get_backend_pid()
    finally:
        idle.close()
    assert state.is_failed()
    assert state.message.startswith("failed at preflight, nothing changed: 1 session(s) would "
                                    "block the migration")
    assert f"pid {pid} (forgotten-shell, idle in transaction since" in state.message
    assert "UPDATE sourcedir SET path = ? WHERE id = ?" in state.message
    assert "token-abc123" not in state.message
    assert schema_dump(db_url) == before
    assert list_backups(flow_env) == []  # stopped before the backup
