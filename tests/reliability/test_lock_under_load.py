"""A long query holds a lock on the table the migration alters while pgbench writes to it: the
apply gives up at lock_timeout, tries again after a jittered backoff, and succeeds once the
blocker ends; the application (pgbench) sees no error meanwhile."""

from __future__ import annotations

import logging
import subprocess
import threading

import psycopg2
from helpers import query

from dbcore.migrate.plan import plan_apply
from dbcore.migrate.retry import apply_retrying, backoff
from dbcore.services.postgres import find_pg_bindir

ADD_NOTE = '''"""005: a note on each project."""


def migrate(migrator, database, *, fake=False):
    migrator.sql("ALTER TABLE project ADD COLUMN note text")


def rollback(migrator, database, *, fake=False):
    migrator.sql("ALTER TABLE project DROP COLUMN note")
'''
WRITES = """\\set id random(1, 50)
UPDATE project SET updated_at = now() WHERE id = :id;
"""


def test_backoff_doubles_and_is_jittered():
    waits = [backoff(1.0, n) for n in range(4)]
    for n, wait in enumerate(waits):
        assert 0.5 * 2 ** n <= wait <= 1.5 * 2 ** n
    assert len({round(backoff(1.0, 0), 6) for _ in range(20)}) > 1  # two runs do not collide again


def test_a_lock_holder_under_pgbench_load_delays_the_apply_without_errors(
        target, db_url, app_at_003, migrations_dir, tmp_path, caplog):
    query(db_url, "INSERT INTO project (name, slug, created_at, updated_at) "
                  "SELECT 'p' || g, 'p' || g, now(), now() FROM generate_series(2, 60) g")
    (migrations_dir / "005_add_note.py").write_text(ADD_NOTE)
    cfg = app_at_003.model_copy(update={"lock_timeout": "1s", "lock_retries": 8,
                                        "lock_retry_delay": 0.3})
    script = tmp_path / "writes.sql"
    script.write_text(WRITES)
    pgbench = subprocess.Popen(
        [str(find_pg_bindir("pgbench") / "pgbench"), "--no-vacuum", "--client=2", "--jobs=1",
         "--time=12", f"--file={script}", db_url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    blocker = psycopg2.connect(db_url, application_name="long report")
    blocker.autocommit = True
    long_query = threading.Thread(target=lambda: blocker.cursor().execute(
        "SELECT pg_sleep(8), count(*) FROM project"))
    long_query.start()
    try:
        plan = plan_apply(target, cfg)
        with caplog.at_level(logging.WARNING, logger="dbcore.migrate.retry"):
            report = apply_retrying(plan, target, cfg)
    finally:
        long_query.join()
        blocker.close()
        output, _ = pgbench.communicate(timeout=60)
    gave_up = [r for r in caplog.records if "gave up at lock_timeout=1s" in r.getMessage()]
    assert gave_up, "the apply never waited for the lock"
    assert report.names == ["004_fix_sourcedir_language", "005_add_note"]
    assert query(db_url, "SELECT count(*) FROM information_schema.columns WHERE "
                         "table_name = 'project' AND column_name = 'note'") == [(1,)]
    assert pgbench.returncode == 0, output
    assert "number of failed transactions: 0" in output and "aborted" not in output, output
