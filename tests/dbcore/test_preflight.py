"""Preflight: sessions that would block a migration are waited for, then named; literals never shown."""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest
from helpers import apply_pending, query

from dbcore.deploy.preflight import mask_query, preflight
from dbcore.deploy.touched import tables_in_files, tables_in_sql
from dbcore.errors import PreflightFailed


@pytest.fixture
def app(target, settings, migrations_dir):
    """The sample application's schema, and settings with a short preflight wait."""
    cfg = settings.model_copy(update={"migrations_dir": migrations_dir, "preflight_wait": 1.5,
                                      "preflight_idle_seconds": 0.3})
    apply_pending(target, cfg)
    return cfg


def _session(url: str, application: str):
    conn = psycopg2.connect(url, application_name=application)
    return conn


def test_literals_never_show_in_a_masked_query():
    assert mask_query("UPDATE project SET name = 'hunter2' WHERE id = 42") == \
        "UPDATE project SET name = ? WHERE id = ?"
    # cut off mid-string by track_activity_query_size: still masked
    assert "s3cr" not in mask_query("ALTER ROLE app PASSWORD 's3cr")
    assert mask_query("SELECT $$pw$$, E'a\\'b', 1.5e3 FROM t2 -- token=abc") == "SELECT ?, ?, ? FROM t2"
    assert len(mask_query("SELECT " + "x, " * 100 + "1 FROM t")) == 80


def test_an_idle_transaction_on_a_touched_table_fails_naming_the_session(app, target, db_url):
    idle = _session(db_url, "report-job")
    try:
        idle.cursor().execute("SELECT count(*) FROM project WHERE name <> 'very secret value'")
        time.sleep(0.5)
        with pytest.raises(PreflightFailed) as failure:
            preflight(target, app, {"project"}, "before the backup")
        text = str(failure.value)
        pid = idle.get_backend_pid()
        assert f"pid {pid} (report-job, idle in transaction since " in text
        assert "holding a lock on project" in text and "MIGRATE_PREFLIGHT_WAIT=1.5s" in text
        assert "SELECT count(*) FROM project WHERE name <> ?" in text
        assert "very secret value" not in text
        # a table the plan does not touch is no blocker
        assert preflight(target, app, {"document"}, "before the backup").waited_for == ()
    finally:
        idle.close()


def test_the_preflight_waits_for_a_blocker_that_ends(app, target, db_url):
    idle = _session(db_url, "slow-report")
    idle.cursor().execute("SELECT 1 FROM project")
    time.sleep(0.5)  # idle longer than the preflight_idle_seconds of these settings
    threading.Timer(1.0, idle.close).start()
    report = preflight(target, app.model_copy(update={"preflight_wait": 10}), {"project"},
                       "before the apply")
    assert [b.application for b in report.waited_for] == ["slow-report"]
    assert 0.5 <= report.waited < 10
    assert "clear" in report.text() and "after waiting" in report.text()


def test_a_long_query_holding_a_lock_and_a_pg_dump_and_another_run_are_blockers(app, target, db_url):
    busy = _session(db_url, "batch")
    busy.autocommit = True
    runner = threading.Thread(target=lambda: busy.cursor().execute(
        "SELECT pg_sleep(3), count(*) FROM project"))
    runner.start()
    dumper = _session(db_url, "pg_dump")
    dumper.cursor().execute("SELECT 1")
    other_run = _session(db_url, "dbmigrate lock: apply by someone")
    other_run.autocommit = True
    other_run.cursor().execute("SELECT pg_advisory_lock(%s)", (app.advisory_lock_key,))
    try:
        time.sleep(1.2)  # longer than the lock_timeout of the test settings (1s)
        with pytest.raises(PreflightFailed) as failure:
            preflight(target, app.model_copy(update={"preflight_wait": 0.5}), None, "before the apply")
        text = str(failure.value)
        assert "(every table)" in text
        assert "(batch, active since" in text and "holding a lock on project" in text
        assert "SELECT pg_sleep(?), count(*) FROM project" in text
        assert "a pg_dump" in text
        assert "dbmigrate lock: apply by someone" in text and "another migration run" in text
    finally:
        runner.join()
        for conn in (busy, dumper, other_run):
            conn.close()
    assert query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'batch'") == [(0,)]


def test_the_tables_of_a_plan_come_from_its_files_or_its_sql(migrations_dir):
    assert {"sourcedir"} <= tables_in_files([migrations_dir / "004_fix_sourcedir_language.py"])
    assert "project" in tables_in_files([migrations_dir / "003_add_project_slug.py"])
    assert tables_in_sql(['ALTER TABLE "document" ADD COLUMN x int',
                          "UPDATE sourcedir SET language = %s -- params: ['el']",
                          'ALTER TABLE a ADD FOREIGN KEY (p) REFERENCES project (id)']) == \
        {"document", "sourcedir", "a", "project"}
    assert tables_in_sql(["NOT SQL AT ALL"]) is None  # cannot tell: every table counts
