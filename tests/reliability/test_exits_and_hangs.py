"""Migration code that exits or hangs: `sys.exit`, `os._exit` and a Python-side sleep inside the
batch are failures naming the file, with the database exactly as before."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import psycopg2
import pytest
from helpers import query, schema_dump, wait_until

APPLIED = "SELECT name FROM migratehistory ORDER BY id"


def _migration(body: str, top: str = "") -> str:
    return textwrap.dedent(f"""\
        \"\"\"005: misbehaves on purpose.\"\"\"
        import os
        import sys
        import time
        {top}

        def migrate(migrator, database, *, fake=False):
            database.execute_sql("ALTER TABLE project ADD COLUMN flag integer")  # dbmigrate: allow DM001
            {body}


        def rollback(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE project DROP COLUMN flag")  # dbmigrate: allow DM003
        """)


def _dbmigrate(*args: str, db_url: str, migrations_dir, **extra: str):
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "FLY_APP_NAME", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY")}
    env.update(DATABASE_URL=db_url, MIGRATE_MIGRATIONS_DIR=str(migrations_dir), **extra)
    return subprocess.run([sys.executable, "-m", "dbcore.cli", *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("body, top, says", [
    ("sys.exit(0)", "", "migrate() of 005_misbehaves.py called sys.exit(0)"),
    ("os._exit(0)", "", "the process running migrate() of 005_misbehaves.py exited with code 0"),
    ("os.kill(os.getpid(), 9)", "", "the process running migrate() of 005_misbehaves.py was killed by SIGKILL"),
    ("pass", "sys.exit(0)", "005_misbehaves.py calls sys.exit(0) on load"),
], ids=["sys.exit", "os._exit", "SIGKILL", "module-level sys.exit"])
def test_an_exit_in_migration_code_is_a_failure_naming_the_file(
        db_url, migrations_dir, app_at_003, body, top, says):
    (migrations_dir / "005_misbehaves.py").write_text(_migration(body, top))
    before, history = schema_dump(db_url), query(db_url, APPLIED)
    result = _dbmigrate("apply", db_url=db_url, migrations_dir=migrations_dir)
    assert result.returncode != 0, result.stdout + result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert says in last
    assert schema_dump(db_url) == before and query(db_url, APPLIED) == history


def test_a_sleep_inside_the_batch_frees_the_app_at_the_idle_timeout_and_fails_at_the_deadline(
        db_url, migrations_dir, app_at_003):
    (migrations_dir / "005_misbehaves.py").write_text(_migration("time.sleep(600)"))
    before = schema_dump(db_url)
    done = {}
    apply = threading.Thread(target=lambda: done.setdefault("result", _dbmigrate(
        "apply", db_url=db_url, migrations_dir=migrations_dir,
        MIGRATE_IDLE_IN_TRANSACTION_TIMEOUT="1s", MIGRATE_APPLY_DEADLINE="30")))
    apply.start()
    wait_until(lambda: query(db_url, "SELECT count(*) FROM pg_locks l JOIN pg_class c ON "
                                     "c.oid = l.relation WHERE c.relname = 'project' AND "
                                     "l.mode = 'AccessExclusiveLock'")[0][0],
               "the ALTER's lock", timeout=120, gave_up=lambda: not apply.is_alive())
    # the app's read waits for the lock until the server ends the idle transaction (not 600 s)
    with psycopg2.connect(db_url, options="-c statement_timeout=120s") as conn, conn.cursor() as cur:
        cur.execute("SELECT name FROM project")
        assert cur.fetchall() == [("kept",)]
    conn.close()
    apply.join(240)
    assert not apply.is_alive(), "the apply did not end at its deadline"
    result = done["result"]
    assert result.returncode != 0
    assert "005_misbehaves" in result.stderr.strip().splitlines()[-1]
    assert schema_dump(db_url) == before


def test_the_whole_apply_has_a_deadline_enforced_from_outside(db_url, migrations_dir, app_at_003):
    # a statement in flight is no idle transaction: only the deadline stops it
    (migrations_dir / "005_misbehaves.py").write_text(
        _migration('database.execute_sql("SELECT pg_sleep(600)")  # dbmigrate: allow DM001'))
    before = schema_dump(db_url)
    result = _dbmigrate("apply", db_url=db_url, migrations_dir=migrations_dir,
                        MIGRATE_APPLY_DEADLINE="5", MIGRATE_STATEMENT_TIMEOUT="0")
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "005_misbehaves ran past MIGRATE_APPLY_DEADLINE=5s" in last
    assert "nothing was changed" in last
    assert schema_dump(db_url) == before
    assert query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE query LIKE '%pg_sleep(600)%' "
                         "AND pid <> pg_backend_pid()") == [(0,)]
