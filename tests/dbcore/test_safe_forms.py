"""Safe forms and phases: what a team writing ordinary peewee-migrate files gets on a live table.

Each safe form is compared with the plain form (safe forms off, and pw_migrate itself applying the
same files): the SQL it runs, the lock the batch holds, and the resulting schema, identical.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg2
import pytest
from helpers import REPO, apply_pending, query, rollback_last, wait_until

from dbcore.connection import Env, Target
from dbcore.errors import PhaseFailed, UnsafeChange
from dbcore.migrate.plan import plan_apply
from dbcore.services.postgres import find_pg_bindir

#: 001: an existing table with rows, made by the migrator as a team would
BASE = '''
import peewee as pw


class Owner(pw.Model):
    name = pw.CharField(max_length=50, unique=True)

    class Meta:
        table_name = "owner"


class Item(pw.Model):
    title = pw.CharField(max_length=100, null=True)
    qty = pw.IntegerField(null=True)

    class Meta:
        table_name = "item"


def migrate(migrator, database, *, fake=False):
    migrator.create_model(Owner)
    migrator.create_model(Item)
    migrator.sql("INSERT INTO owner (name) VALUES ('a'), ('b')")
    migrator.sql("INSERT INTO item (title, qty) SELECT 't' || g, g FROM generate_series(1, 2000) g")


def rollback(migrator, database, *, fake=False):
    migrator.remove_model("item")
    migrator.remove_model("owner")
'''

#: written at the end of a change: the locks the batch holds on item until its commit
LOCKS_SEEN = ('    migrator.sql("CREATE TABLE locks_seen AS SELECT mode FROM pg_locks WHERE pid = '
              'pg_backend_pid() AND relation = \'item\'::regclass")\n')

CHANGES = {
    "add_index": 'migrator.add_index("item", "title")\n',
    "unique_field": 'migrator.add_fields("item", code=pw.CharField(max_length=20, null=True, unique=True))\n',
    "foreign_key": ('migrator.add_fields("item", owner=pw.ForeignKeyField(migrator.orm["owner"], '
                    'null=True, on_delete="CASCADE"))\n'),
    "add_not_null": 'migrator.add_not_null("item", "title")\n',
    "not_null_with_default": 'migrator.add_fields("item", state=pw.CharField(max_length=10, default="new"))\n',
    "check_constraint": 'migrator.add_constraint("item", "item_qty_positive", pw.SQL("CHECK (qty > 0)"))\n',
}


def change_file(body: str, *, header: str = "", locks: bool = True) -> str:
    code = textwrap.indent(body, "    ")
    return (f"import peewee as pw\n{header}\n\ndef migrate(migrator, database, *, fake=False):\n{code}"
            f"{LOCKS_SEEN if locks else ''}\n\ndef rollback(migrator, database, *, fake=False):\n    pass\n")


def folder(tmp_path: Path, name: str, change: str, **kwargs) -> Path:
    d = tmp_path / name
    d.mkdir()
    (d / "001_base.py").write_text(BASE)
    (d / "002_change.py").write_text(change_file(change, **kwargs))
    return d


def table_schema(url: str, *tables: str) -> str:
    args = [str(find_pg_bindir("pg_dump") / "pg_dump"), "--schema-only", "--no-owner", url]
    for t in tables:
        args += ["-t", t]
    out = subprocess.run(args, check=True, capture_output=True, text=True).stdout
    return "\n".join(line for line in out.splitlines()
                     if not line.startswith(("\\restrict", "\\unrestrict", "--")))


def pw_migrate(url: str, directory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "pw_migrate"), "migrate", "--database", url,
                           "--directory", str(directory)], capture_output=True, text=True, timeout=120)


def locks_seen(url: str) -> set[str]:
    return {r[0] for r in query(url, "SELECT mode FROM locks_seen")}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_each_safe_form_gives_the_plain_form_s_schema_without_its_long_locks(
        change, make_database, settings, tmp_path):
    safe_url, plain_url, pw_url = make_database(), make_database(), make_database()
    d = folder(tmp_path, "m", CHANGES[change])

    safe_cfg = settings.model_copy(update={"migrations_dir": d})
    plain_cfg = settings.model_copy(update={"migrations_dir": d, "safe_forms": False})
    # 001 first: the change is on a table that exists, with rows, as in production
    apply_pending(Target(Env.LOCAL, safe_url), safe_cfg, upto="001")
    apply_pending(Target(Env.LOCAL, plain_url), plain_cfg, upto="001")
    report = apply_pending(Target(Env.LOCAL, safe_url), safe_cfg)
    plain = apply_pending(Target(Env.LOCAL, plain_url), plain_cfg)
    for name in ("001_base", "002_change"):
        ran = pw_migrate(pw_url, d) if name == "002_change" else subprocess.run(
            [str(Path(sys.executable).parent / "pw_migrate"), "migrate", "--database", pw_url,
             "--directory", str(d), "--name", name], capture_output=True, text=True, timeout=120)
        assert ran.returncode == 0, ran.stderr[-2000:]

    # the same schema as the plain form's, and as pw_migrate's from the same files
    assert table_schema(safe_url, "item", "owner") == table_schema(plain_url, "item", "owner")
    assert table_schema(safe_url, "item", "owner") == table_schema(pw_url, "item", "owner")
    assert query(safe_url, "SELECT count(*) FROM item")[0][0] == 2000
    assert not query(safe_url, "SELECT 1 FROM pg_index WHERE NOT indisvalid")
    assert plain.steps == ()
    sql = "\n".join(report.results[-1].sql)
    steps = "\n".join(report.steps)
    held = locks_seen(safe_url)
    if change in ("add_index", "unique_field"):
        assert "CONCURRENTLY" in steps and "CREATE INDEX" not in sql and "CREATE UNIQUE INDEX" not in sql
        # the plain form holds SHARE (every write waits) until the batch commits; this one nothing
        assert "ShareLock" in locks_seen(plain_url) and "ShareLock" not in held
        assert report.phase_line.startswith("reached phase 2")
    if change in ("foreign_key", "check_constraint"):
        assert "NOT VALID" in sql and "VALIDATE CONSTRAINT" in steps
        assert report.phase_line.startswith("reached phase 4")
    if change == "add_not_null":
        assert 'CHECK ("title" IS NOT NULL) NOT VALID' in sql and "SET NOT NULL" not in sql
        assert "SET NOT NULL" in steps and "VALIDATE CONSTRAINT" in steps
        assert not query(safe_url, "SELECT 1 FROM pg_constraint WHERE conname = 'item_title_not_null'")
    if change == "not_null_with_default":
        # one ADD COLUMN ... NOT NULL DEFAULT: no UPDATE of every row
        assert "UPDATE" not in sql and "NOT NULL DEFAULT" in sql
        assert "UPDATE" in "\n".join(plain.results[-1].sql)
        assert query(safe_url, "SELECT count(*) FROM item WHERE state = 'new'")[0][0] == 2000


def test_a_table_created_in_the_same_batch_gets_the_plain_forms(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["add_index"], locks=False)
    report = apply_pending(target, settings.model_copy(update={"migrations_dir": d}))  # 001 and 002
    assert report.steps == () and 'CREATE INDEX "item_title"' in "\n".join(report.results[-1].sql)


def test_a_file_can_turn_safe_forms_off(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["add_index"], header="safe_forms = False\n")
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    report = apply_pending(target, cfg)
    assert report.steps == () and 'CREATE INDEX "item_title"' in "\n".join(report.results[-1].sql)


def test_a_rewriting_type_change_is_refused_with_the_recipe(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", 'migrator.change_fields("item", qty=pw.BigIntegerField(null=True))\n')
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    with pytest.raises(UnsafeChange) as caught:
        apply_pending(target, cfg)
    message = str(caught.value)
    assert "from integer to BIGINT" in message and "add a new column" in message
    assert "nothing was changed" in message
    # allowed in the file: it runs
    (d / "002_change.py").write_text(change_file(
        'migrator.change_fields("item", qty=pw.BigIntegerField(null=True))\n', header="allow_table_rewrite = True\n"))
    apply_pending(target, cfg)
    assert query(db_url, "SELECT data_type FROM information_schema.columns WHERE table_name = 'item' "
                         "AND column_name = 'qty'") == [("bigint",)]


def test_a_later_operation_that_needs_a_deferred_index_gets_its_plain_form(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", 'migrator.add_index("item", "title")\nmigrator.drop_index("item", "title")\n',
               locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    report = apply_pending(target, cfg)
    assert any("plain form (a later drop_index of item_title" in line for line in report.steps)
    assert not query(db_url, "SELECT 1 FROM pg_class WHERE relname = 'item_title'")


PIPELINE = '''
migrator.add_fields("item", label=pw.CharField(max_length=20, null=True))
migrator.backfill("item", set={"label": pw.SQL("'item ' || id")}, where="label IS NULL",
                  batch_size=300, pause=PAUSE)
'''


def pipeline(tmp_path: Path, pause: str) -> Path:
    """002 adds a nullable column and backfills it, 003 makes it required: one deploy."""
    d = folder(tmp_path, "m", PIPELINE.replace("PAUSE", pause), locks=False)
    (d / "003_required.py").write_text(change_file('migrator.add_not_null("item", "label")\n', locks=False))
    return d


def test_add_nullable_backfill_make_required_in_one_deploy(target, settings, tmp_path, db_url):
    d = pipeline(tmp_path, "0")
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    report = apply_pending(target, cfg)
    assert report.phase_line.startswith("reached phase 4 (validation)")
    assert query(db_url, "SELECT is_nullable FROM information_schema.columns WHERE table_name = 'item' "
                         "AND column_name = 'label'") == [("NO",)]
    assert query(db_url, "SELECT count(*) FROM item WHERE label = 'item ' || id")[0][0] == 2000
    phases = [r["action"] for r in _audit(db_url)]
    assert "phase 3" in phases and "phase 4" in phases


def _audit(url):
    rows = query(url, "SELECT name, action FROM migration_audit ORDER BY id")
    return [{"name": n, "action": a} for n, a in rows]


def test_a_failed_validation_leaves_a_valid_schema_and_a_rerun_continues(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["check_constraint"], locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    query(db_url, "UPDATE item SET qty = 0 WHERE id = 7")
    with pytest.raises(PhaseFailed) as caught:
        apply_pending(target, cfg)
    assert caught.value.phase == 4 and "rows violate it" in str(caught.value)
    # phase 1 stands: the constraint is there, NOT VALID, enforced for new rows
    assert query(db_url, "SELECT convalidated FROM pg_constraint WHERE conname = 'item_qty_positive'") == [(False,)]
    with pytest.raises(psycopg2.errors.CheckViolation):
        query(db_url, "INSERT INTO item (title, qty) VALUES ('x', -1)")
    assert "phase 4 of 002_change" in plan_apply(target, cfg).steps_pending[0]
    query(db_url, "UPDATE item SET qty = 1 WHERE qty <= 0")
    report = apply_pending(target, cfg)
    assert report.summary().startswith("continued an earlier apply: reached phase 4")
    assert query(db_url, "SELECT convalidated FROM pg_constraint WHERE conname = 'item_qty_positive'") == [(True,)]
    assert plan_apply(target, cfg).empty


def test_an_index_build_blocked_through_every_retry_is_continued_by_a_rerun(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["add_index"], locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d, "lock_retries": 1, "lock_retry_delay": 0.1})
    apply_pending(target, cfg, upto="001")
    blocker = psycopg2.connect(db_url)
    try:
        with blocker.cursor() as cur:  # an open writing transaction: CONCURRENTLY waits for it
            cur.execute("UPDATE item SET qty = qty WHERE id = 1")
        with pytest.raises(PhaseFailed) as caught:
            apply_pending(target, cfg)
    finally:
        blocker.rollback()
        blocker.close()
    assert caught.value.phase == 2 and "run `dbmigrate apply` again" in str(caught.value)
    assert query(db_url, "SELECT name FROM migratehistory ORDER BY id")[-1] == ("002_change",)
    report = apply_pending(target, cfg)
    assert report.phase_line.startswith("reached phase 2")
    assert query(db_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'item_title'::regclass") == [(True,)]


def test_a_backfill_killed_midway_continues_from_its_last_batch(target, settings, tmp_path, db_url):
    d = pipeline(tmp_path, "0.3")
    env = {**os.environ, "DATABASE_URL": db_url, "MIGRATE_MIGRATIONS_DIR": str(d), "MIGRATE_ENV": "local"}
    cmd = [sys.executable, "-m", "dbcore.cli", "apply", "--env", "local"]
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    out = tmp_path / "apply.log"
    with out.open("w") as sink:  # a file: a pipe nobody reads would fill up
        proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
    try:
        def reached() -> int:
            rows = query(db_url, "SELECT (detail->>'done_up_to')::int FROM migration_phase_step "
                                 "WHERE kind = 'backfill'") if _has_steps(db_url) else []
            return rows[0][0] or 0 if rows else 0

        wait_until(lambda: reached() >= 600, "two committed batches", timeout=120,
                   gave_up=lambda: proc.poll() is not None, log=out.read_text)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = reached()
    assert stopped < 2000
    filled = query(db_url, "SELECT count(*) FROM item WHERE label IS NOT NULL")[0][0]
    assert filled == stopped  # every committed batch, and only those
    report = apply_pending(target, cfg)
    assert report.phase_line.startswith("reached phase 4")
    assert query(db_url, "SELECT count(*) FROM item WHERE label = 'item ' || id")[0][0] == 2000
    assert query(db_url, "SELECT (detail->>'rows')::int FROM migration_phase_step WHERE kind = 'backfill'") == [(2000,)]


#: phase 2 waits for an open writer (CONCURRENTLY waits for every transaction that may write
#: the table); phase 4 validates a CHECK whose function takes 5 ms a row (10 s for 2000 rows)
KILLED_IN = {
    "add_index": (CHANGES["add_index"], "UPDATE item SET qty = qty WHERE id = 1", "CONCURRENTLY"),
    "check_constraint": (
        'migrator.sql("CREATE FUNCTION slow_positive(q int) RETURNS boolean LANGUAGE plpgsql AS '
        '$f$ BEGIN PERFORM pg_sleep(0.005); RETURN q > 0; END $f$")\n'
        'migrator.add_constraint("item", "item_qty_positive", pw.SQL("CHECK (slow_positive(qty))"))\n',
        None, "VALIDATE CONSTRAINT"),
}


@pytest.mark.parametrize("change", sorted(KILLED_IN))
def test_a_process_killed_in_a_step_after_the_commit_is_continued_by_a_clean_rerun(
        change, target, settings, tmp_path, db_url):
    """SIGKILL while phase 2 (an index build) or phase 4 (a validation) runs: the batch stays
    committed and valid, and the next apply finishes the step (an INVALID leftover dropped first)."""
    body, blocking, statement = KILLED_IN[change]
    d = folder(tmp_path, "m", body, locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    env = {**os.environ, "DATABASE_URL": db_url, "MIGRATE_MIGRATIONS_DIR": str(d),
           "MIGRATE_LOCK_RETRIES": "20", "MIGRATE_LOCK_RETRY_DELAY": "0.5"}
    blocker = psycopg2.connect(db_url)
    out = tmp_path / "apply.log"
    try:
        if blocking:
            with blocker.cursor() as cur:
                cur.execute(blocking)
        with out.open("w") as sink:
            proc = subprocess.Popen([sys.executable, "-m", "dbcore.cli", "apply", "--env", "local"],
                                    env=env, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_until(lambda: query(db_url, "SELECT count(*) FROM pg_stat_activity WHERE pid <> "
                                             "pg_backend_pid() AND state = 'active' AND query LIKE %s",
                                     (f"%{statement}%",))[0][0] > 0,
                       f"the step's {statement} to run", timeout=120,
                       gave_up=lambda: proc.poll() is not None, log=out.read_text)
            time.sleep(0.5)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        # its server session would finish the statement on its own: end it, as a restart would
        query(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                      "AND query LIKE %s", (f"%{statement}%",))
        wait_until(lambda: not query(db_url, "SELECT 1 FROM pg_stat_activity WHERE pid <> pg_backend_pid() "
                                             "AND query LIKE %s", (f"%{statement}%",)),
                   "the killed run's session to end", timeout=30)
        if change == "add_index":  # the build it left: INVALID, dropped by the rerun first
            assert query(db_url, "SELECT indisvalid FROM pg_index WHERE indexrelid = 'item_title'::regclass") \
                == [(False,)]
    finally:
        blocker.rollback()
        blocker.close()
    # the batch committed: the migration is applied, what it made valid on its own
    assert query(db_url, "SELECT name FROM migratehistory ORDER BY id")[-1] == ("002_change",)
    assert query(db_url, "SELECT state FROM migration_phase_step") != [("done",)]
    report = apply_pending(target, cfg)
    assert report.summary().startswith("continued an earlier apply: reached phase")
    if change == "add_index":  # one index of that name, valid
        assert query(db_url, "SELECT i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                             "WHERE c.relname LIKE 'item_title%'") == [(True,)]
    else:
        assert query(db_url, "SELECT convalidated FROM pg_constraint WHERE conname = 'item_qty_positive'") \
            == [(True,)]
    assert plan_apply(target, cfg).empty


def test_a_session_lost_in_a_step_is_one_line_naming_the_phase_and_the_rerun(settings, tmp_path, db_url):
    """The server ends the session mid-VALIDATE (a restart, a failover): PhaseFailed naming the
    phase and the fix, not a driver error; the next apply continues."""
    body, _, statement = KILLED_IN["check_constraint"]
    d = folder(tmp_path, "m", body, locks=False)
    env = {**os.environ, "DATABASE_URL": db_url, "MIGRATE_MIGRATIONS_DIR": str(d)}

    def dbmigrate(*args, wait=True):
        run = subprocess.Popen([sys.executable, "-m", "dbcore.cli", *args, "--env", "local"], env=env,
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return run.communicate(timeout=120) + (run.returncode,) if wait else run

    assert dbmigrate("apply", "--target", "001")[2] == 0
    running = dbmigrate("apply", wait=False)
    wait_until(lambda: query(db_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid <> "
                                     "pg_backend_pid() AND state = 'active' AND query LIKE %s",
                             (f"%{statement}%",)), f"{statement} to run", timeout=120,
               gave_up=lambda: running.poll() is not None)
    _, err = running.communicate(timeout=120)
    assert running.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("dbmigrate: error: phase 4 (validation) of 002_change: validate item_qty_positive")
    assert "the connection to the server was lost: run `dbmigrate apply` again once it is back" in last
    assert "Traceback" not in err
    out, err, code = dbmigrate("apply")
    assert code == 0, err
    assert out.strip().splitlines()[-1].startswith("continued an earlier apply: reached phase 4")


def _has_steps(url):
    return bool(query(url, "SELECT to_regclass('migration_phase_step') IS NOT NULL")[0][0])


def test_rolling_back_a_migration_cancels_its_pending_steps(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["check_constraint"], locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    query(db_url, "UPDATE item SET qty = 0 WHERE id = 7")
    with pytest.raises(PhaseFailed):
        apply_pending(target, cfg)
    (d / "002_change.py").write_text((d / "002_change.py").read_text().replace(
        "    pass\n", '    migrator.drop_constraints("item", "item_qty_positive")\n'))
    rollback_last(target, cfg)
    assert plan_apply(target, cfg).steps_pending == ()
    assert not query(db_url, "SELECT 1 FROM pg_constraint WHERE conname = 'item_qty_positive'")


def test_a_large_update_in_the_batch_is_measured_and_points_to_backfill(target, settings, tmp_path, db_url):
    from dbcore.deploy.rehearsal import large_update_findings
    from dbcore.migrate.backfill import LargeUpdates
    from dbcore.migrate.runner import execute

    d = folder(tmp_path, "m", 'migrator.sql("UPDATE item SET qty = qty + 1")\n'
                              'migrator.sql("UPDATE item SET qty = 0 WHERE id < 10")\n', locks=False)
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    large = LargeUpdates(1000)
    execute(plan_apply(target, cfg), target, cfg, observers=[large])
    [found] = large_update_findings(large)
    assert (found.rule, found.severity, found.file) == ("DS108", "warning", "002_change.py")
    assert "changed 2000 rows" in found.message and "migrator.backfill" in found.message


def test_the_lint_says_backfill_is_dbmigrate_s_own_and_the_safe_forms_are_notes(tmp_path):
    from dbcore.lint.engine import lint_source

    source = change_file(PIPELINE.replace("PAUSE", "0") + 'migrator.add_index("item", "title")\n', locks=False)
    found = {f.rule: f for f in lint_source(source, "002_change.py")}
    assert found["DM013"].severity == "note" and "pw_migrate cannot run this file" in found["DM013"].message
    assert found["DS101"].severity == "note" and "CONCURRENTLY after the batch's commit" in found["DS101"].message
    off = {f.rule: f for f in lint_source("safe_forms = False\n" + source, "002_change.py")}
    assert off["DS101"].severity == "warning"


def test_the_cli_shows_the_phases_status_lists_what_is_left_and_apply_continues(settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["check_constraint"] + CHANGES["add_index"], locks=False)
    env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, "DATABASE_URL": db_url}

    def dbmigrate(*args):
        return subprocess.run([sys.executable, "-m", "dbcore.cli", *args, "--migrations-dir", str(d)],
                              capture_output=True, text=True, env=env, cwd=REPO, timeout=120)

    assert dbmigrate("apply", "--target", "001").returncode == 0
    query(db_url, "UPDATE item SET qty = -5 WHERE id = 3")
    failed = dbmigrate("apply")
    assert failed.returncode != 0
    assert "[phase 2] index item_title on item: done" in failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("dbmigrate: error: phase 4 (validation) of 002_change: validate item_qty_positive")
    assert "fix those rows, then run `dbmigrate apply` again" in last
    status = dbmigrate("status")
    assert "phase 4 left by run" in status.stdout and "(failed, 1 attempt(s)): 002_change" in status.stdout
    assert "1 step(s) after a committed batch not done: `dbmigrate apply` continues them" in status.stdout
    rows = {r["name"]: r for r in json.loads(dbmigrate("status", "--json").stdout)}
    [left] = rows["002_change"]["steps_left"]
    assert (left["phase"], left["kind"], left["state"]) == (4, "validate", "failed")
    assert rows["001_base"]["steps_left"] == []
    # the audit: the index phase of 002 done, the validation not
    assert query(db_url, "SELECT action FROM migration_audit WHERE name = '002_change' AND action LIKE "
                         "'phase %' ORDER BY id") == [("phase 2",)]
    query(db_url, "UPDATE item SET qty = 5 WHERE id = 3")
    again = dbmigrate("apply")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines()[-1] == (
        "continued an earlier apply: reached phase 4 (validation): 1 step(s) after the batch done")
    assert dbmigrate("status").stdout.strip().endswith("up to date")
    # --no-safe-forms: the plain forms, nothing after the commit
    (d / "003_more.py").write_text(change_file('migrator.add_index("item", "qty")\n', locks=False))
    plain = dbmigrate("apply", "--no-safe-forms")
    assert plain.returncode == 0 and "reached phase" not in plain.stdout and "[phase" not in plain.stderr


def test_a_rollback_drops_the_index_concurrently_after_its_commit(target, settings, tmp_path, db_url):
    d = folder(tmp_path, "m", CHANGES["add_index"], locks=False)
    (d / "002_change.py").write_text((d / "002_change.py").read_text().replace(
        "    pass\n", '    migrator.drop_index("item", "title")\n'))
    cfg = settings.model_copy(update={"migrations_dir": d})
    apply_pending(target, cfg, upto="001")
    apply_pending(target, cfg)
    report = rollback_last(target, cfg)
    assert "DROP INDEX CONCURRENTLY" in "\n".join(report.steps)
    assert report.phase_line.startswith("reached phase 2")
    assert not query(db_url, "SELECT 1 FROM pg_class WHERE relname = 'item_title'")


def test_validation_after_the_commit_lets_an_open_writer_be(target, settings, tmp_path, db_url):
    """VALIDATE CONSTRAINT takes SHARE UPDATE EXCLUSIVE: a transaction holding a written row keeps
    going while phase 4 validates; the plain form's ADD CONSTRAINT would wait for it."""
    from dbcore.errors import TableLockTimeout
    from dbcore.migrate.observe import RunObserver
    from dbcore.migrate.runner import execute

    d = folder(tmp_path, "m", CHANGES["check_constraint"], locks=False)
    (d / "002_change.py").write_text((d / "002_change.py").read_text().replace(
        "    pass\n", '    migrator.drop_constraints("item", "item_qty_positive")\n'))
    cfg = settings.model_copy(update={"migrations_dir": d, "lock_retries": 0})
    apply_pending(target, cfg, upto="001")
    writer = psycopg2.connect(db_url)

    class WriterAfterTheBatch(RunObserver):
        def phase_done(self, phase, results):  # the batch committed: the application writes on
            with writer.cursor() as cur:
                cur.execute("UPDATE item SET qty = qty + 1 WHERE id = 1")

    try:
        report = execute(plan_apply(target, cfg), target, cfg, observers=[WriterAfterTheBatch()])
        assert report.phase_line.startswith("reached phase 4")
        held = query(db_url, "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                             "WHERE l.relation = 'item'::regclass AND l.mode = 'RowExclusiveLock' "
                             "AND a.state = 'idle in transaction'")
        assert held == [(1,)]  # the writer was never made to wait, and still holds its row
    finally:
        writer.rollback()
    rollback_last(target, cfg)
    plain = cfg.model_copy(update={"safe_forms": False})
    with writer.cursor() as cur:
        cur.execute("UPDATE item SET qty = qty + 1 WHERE id = 1")
    try:
        with pytest.raises(TableLockTimeout):
            apply_pending(target, plain)
    finally:
        writer.rollback()
        writer.close()
