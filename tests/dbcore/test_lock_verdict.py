"""What the live application will feel: each change's lock, rewrite and window, measured on a copy.

Every change runs as a migration through the runner on a database of 100k rows, measured by the
rehearsal's meter; the verdict is what the approver reads. The budget and the major version are
judged as the rehearsal judges them.
"""

from __future__ import annotations

import textwrap
import uuid

import psycopg2
import pytest
from helpers import query, schema_dump
from pydantic import SecretStr

from dbcore.backup.dump import backup_to_s3
from dbcore.connection import Env, Target
from dbcore.deploy.locks import execute_measured
from dbcore.deploy.plan import DeployPlan
from dbcore.deploy.rehearsal import check_major, rehearse_on_copy
from dbcore.deploy.verdict import judge
from dbcore.errors import RehearsalMajorMismatch
from dbcore.lint.engine import lint_pending
from dbcore.migrate.plan import plan_apply

ROWS = 100_000
AE, SRE, SHARE, SUE = ("AccessExclusiveLock", "ShareRowExclusiveLock", "ShareLock",
                       "ShareUpdateExclusiveLock")


@pytest.fixture(scope="module")
def template_db(pg_server_url):
    """A database of 100k documents and 1000 authors, cloned by each test."""
    name = f"locks_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(pg_server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = pg_server_url.rsplit("/", 1)[0] + "/" + name
    conn = psycopg2.connect(url)
    with conn, conn.cursor() as cur:
        cur.execute("CREATE TABLE author (id serial PRIMARY KEY, name text)")
        cur.execute("INSERT INTO author (name) SELECT 'a' || g FROM generate_series(1, 1000) g")
        cur.execute("CREATE TABLE document (id serial PRIMARY KEY, n int, s varchar(20), "
                    "author_id int)")
        cur.execute("INSERT INTO document (n, s, author_id) SELECT g, 'x' || g, 1 + g %% 1000 "
                    "FROM generate_series(1, %s) g", (ROWS,))
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("VACUUM ANALYZE")  # the estimated rows are read from the statistics
    conn.close()
    yield name
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture
def copy_target(template_db, make_database, pg_server_url) -> Target:
    """A fresh clone of the 100k-row database."""
    name = f"lk_{uuid.uuid4().hex[:10]}"
    admin = psycopg2.connect(pg_server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    admin.close()
    url = pg_server_url.rsplit("/", 1)[0] + "/" + name
    yield Target(Env.LOCAL, url)
    admin = psycopg2.connect(pg_server_url)
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def _write(folder, name: str, *statements: str, atomic: bool = True, allow: bool = False) -> None:
    folder.mkdir(exist_ok=True)
    marker = "  # dbmigrate: allow DL001" if allow else ""
    body = "\n".join(f"    migrator.sql({s!r}){marker}" for s in statements)
    head = "" if atomic else "atomic = False\n\n"
    (folder / f"{name}.py").write_text(head + textwrap.dedent("""\
        def migrate(migrator, database, *, fake=False):
        """) + body + "\n\n\ndef rollback(migrator, database, *, fake=False):\n    pass\n")


def _measure(target, settings, *, budget=5.0, allow_long_locks=False):
    plan = plan_apply(target, settings)
    _, report = execute_measured(plan, target, settings, actor="test")
    files = {m.name: m.path for m in plan.migrations}
    return report, judge(report, budget=budget, files=files, allow_long_locks=allow_long_locks)


CHANGES = [
    # (change, SQL, lock on document, what it blocks, reading)
    ("ADD COLUMN nullable", "ALTER TABLE document ADD COLUMN note text", AE, "reads and writes",
     "none"),
    ("ADD COLUMN constant default", "ALTER TABLE document ADD COLUMN flag int NOT NULL DEFAULT 0",
     AE, "reads and writes", "none"),
    ("ADD COLUMN volatile default",
     "ALTER TABLE document ADD COLUMN token uuid DEFAULT gen_random_uuid()", AE,
     "reads and writes", "rewrite"),
    ("int -> bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint", AE, "reads and writes",
     "rewrite"),
    ("varchar(20) -> text", "ALTER TABLE document ALTER COLUMN s TYPE text", AE,
     "reads and writes", "none"),
    ("SET NOT NULL", "ALTER TABLE document ALTER COLUMN n SET NOT NULL", AE, "reads and writes",
     "scan"),
    ("ADD FOREIGN KEY", "ALTER TABLE document ADD CONSTRAINT document_author_fk FOREIGN KEY "
     "(author_id) REFERENCES author (id)", SRE, "writes", "scan"),
    ("CREATE INDEX", "CREATE INDEX document_n ON document (n)", SHARE, "writes", "scan"),
]


@pytest.mark.parametrize("change, sql, mode, blocks, reading", CHANGES, ids=[c[0] for c in CHANGES])
def test_each_change_shows_its_lock_its_rewrite_and_its_window_to_the_commit(
        copy_target, settings, change, sql, mode, blocks, reading):
    # a later statement of the same batch keeps the lock held until the commit
    _write(settings.migrations_dir, "001_change", sql, "SELECT pg_sleep(0.3)")
    report, verdict = _measure(copy_target, settings)
    line = next(v for v in verdict.tables if v.table == "document")
    assert (line.mode, line.blocks, line.reading) == (mode, blocks, reading)
    taker = next(s for s in report.statements if "document" in s.locks)
    sleep = next(s for s in report.statements if "pg_sleep" in s.sql)
    # the window runs from the lock's statement to the commit, past the statements after it
    assert line.seconds >= taker.seconds + sleep.seconds
    assert line.in_transaction and line.migration == "001_change" and line.statement == 1
    assert line.size is not None and line.size.rows >= ROWS and line.size.bytes > 1_000_000
    text = line.line()
    assert text.startswith("document (") and "to the commit of the batch" in text
    assert ("rewrites the table" in text) == (reading == "rewrite")


def test_an_index_built_concurrently_is_sampled_while_it_runs_and_blocks_nothing(copy_target,
                                                                                settings):
    _write(settings.migrations_dir, "001_index",
           "DROP INDEX CONCURRENTLY IF EXISTS document_n",
           "CREATE INDEX CONCURRENTLY document_n ON document (n)", atomic=False)
    report, verdict = _measure(copy_target, settings)
    line = next(v for v in verdict.tables if v.table == "document")
    assert (line.mode, line.blocks, line.reading) == (SUE, "neither", "scan")
    assert not line.in_transaction and "atomic = False" in line.line()
    built = next(s for s in report.statements if "CREATE INDEX" in s.sql)
    assert built.sampled and built.indexed == ("document",)
    assert verdict.breaches == ()


def test_a_fast_change_before_a_slow_one_is_locked_for_the_whole_batch(copy_target, settings):
    _write(settings.migrations_dir, "001_author_note", "ALTER TABLE author ADD COLUMN note text")
    _write(settings.migrations_dir, "002_bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint")
    report, verdict = _measure(copy_target, settings, budget=0.0)
    author = next(v for v in verdict.tables if v.table == "author")
    rewrite = next(s for s in report.statements if "TYPE bigint" in s.sql)
    assert author.mode == AE and author.reading == "none"
    assert author.seconds >= rewrite.seconds  # its window spans the other table's rewrite
    assert author.cause_migration == "002_bigint" and "held to the commit while 002_bigint" in author.why
    breach = next(b for b in verdict.breaches if b.verdict.table == "author")
    assert "move 001_author_note to a deploy of its own" in breach.text()


def test_rows_changed_block_writes_to_those_rows_until_the_commit(copy_target, settings):
    _write(settings.migrations_dir, "001_fill", "UPDATE document SET s = 'y' WHERE id <= 50000")
    _, verdict = _measure(copy_target, settings, budget=0.0)
    line = next(v for v in verdict.tables if v.table == "document")
    assert line.blocks == "rows" and line.rows == 50_000
    assert "writes to 50,000 rows blocked" in line.line()
    assert "in batches" in verdict.breaches[0].text()


def test_the_measuring_stays_out_of_the_captured_sql(copy_target, settings):
    _write(settings.migrations_dir, "001_change", "ALTER TABLE document ADD COLUMN note text")
    plan = plan_apply(copy_target, settings)
    run, _ = execute_measured(plan, copy_target, settings, actor="test")
    assert run.results[0].sql == ("ALTER TABLE document ADD COLUMN note text",)


def test_an_allow_marker_or_the_flag_lets_a_breach_through(copy_target, settings):
    _write(settings.migrations_dir, "001_bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint",
           allow=True)
    plan = plan_apply(copy_target, settings)
    _, report = execute_measured(plan, copy_target, settings, actor="test")
    files = {m.name: m.path for m in plan.migrations}
    allowed = judge(report, budget=0.0, files=files)
    assert allowed.breaches and allowed.stopping == ()
    assert allowed.breaches[0].allowed_by == "001_bigint.py:2"
    # where the runner recorded each statement's migrator call, only a marker on that line counts
    assert judge(report, budget=0.0, files=files, call_sites={("001_bigint", 1): 2}).stopping == ()
    elsewhere = judge(report, budget=0.0, files=files, call_sites={("001_bigint", 1): 5})
    assert elsewhere.stopping and elsewhere.stopping[0].verdict.table == "document"
    unmarked = judge(report, budget=0.0, files={})
    assert unmarked.stopping and "safe form (DS103)" in unmarked.stopping[0].text()
    flagged = judge(report, budget=0.0, files={}, allow_long_locks=True)
    assert flagged.stopping == () and flagged.breaches[0].allowed_by == "--allow-long-locks"


def test_another_major_is_stated_on_each_line_and_refused_on_demand(copy_target, settings):
    _write(settings.migrations_dir, "001_bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint")
    plan = plan_apply(copy_target, settings)
    _, report = execute_measured(plan, copy_target, settings, actor="test")
    verdict = judge(report, budget=5.0, files={}, target_major=16)
    assert "REHEARSED ON POSTGRESQL 15, PRODUCTION RUNS 16" in verdict.headline()
    assert all(line.endswith("measured on 15, production runs 16") for line in verdict.lines())
    check_major(15, 16, settings)  # stated, not refused, unless asked
    same = settings.model_copy(update={"rehearsal_same_major": True})
    with pytest.raises(RehearsalMajorMismatch, match="runs PostgreSQL 15 and the target runs 16"):
        check_major(15, 16, same)
    check_major(15, 15, same)


@pytest.fixture
def production(copy_target, s3_settings, other_pg_server_url):
    """The 100k-row database as a production target, rehearsed on another server."""
    cfg = s3_settings.model_copy(update={
        "rehearsal_database_url": SecretStr(other_pg_server_url), "lock_budget": 0.0})
    return Target(Env.PRODUCTION, copy_target.url), cfg


def test_a_production_rehearsal_over_the_budget_stops_the_run_with_nothing_changed(production):
    target, cfg = production
    _write(cfg.migrations_dir, "001_bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint")
    before = schema_dump(target.url)
    plan = plan_apply(target, cfg)
    backup = backup_to_s3(target, cfg)
    report = rehearse_on_copy(plan, target, cfg, backup.key)
    deploy = DeployPlan("production", plan, lint_pending(cfg.migrations_dir, []), backup, report)
    assert not deploy.ok and report.over_budget
    stop = deploy.stop_reason()
    assert stop.startswith("document: writes blocked ~")
    assert "001_bigint.py statement 1" in stop and "safe form (DS103)" in stop
    markdown = deploy.to_markdown()
    assert markdown.index("### What the live application will feel") < markdown.index("### Migrations")
    assert "STOPS THE RUN" in markdown and "PostgreSQL 15" in markdown
    assert schema_dump(target.url) == before and query(target.url, "SELECT count(*) FROM document") == [(ROWS,)]

    allowed = rehearse_on_copy(plan, target, cfg, backup.key, allow_long_locks=True)
    deploy = DeployPlan("production", plan, lint_pending(cfg.migrations_dir, []), backup, allowed)
    assert deploy.ok and "ALLOWED over the 0 s budget by --allow-long-locks" in deploy.text()
    from dbcore.migrate.history import ApprovalRecord

    recorded = deploy.record_allowances(ApprovalRecord("ann", "ok", deploy.fingerprint))
    assert recorded.comment.startswith("ok; long locks allowed: document")

    with pytest.raises(RehearsalMajorMismatch):
        rehearse_on_copy(plan, target, cfg.model_copy(update={"rehearsal_same_major": True}),
                         backup.key, target_major=16)
    assert schema_dump(target.url) == before


def test_locally_the_budget_only_warns_and_another_major_is_stated(copy_target, s3_settings):
    cfg = s3_settings.model_copy(update={"lock_budget": 0.0})
    _write(cfg.migrations_dir, "001_bigint", "ALTER TABLE document ALTER COLUMN n TYPE bigint")
    plan = plan_apply(copy_target, cfg)
    backup = backup_to_s3(copy_target, cfg)
    report = rehearse_on_copy(plan, copy_target, cfg, backup.key, target_major=16)
    deploy = DeployPlan("local", plan, lint_pending(cfg.migrations_dir, []), backup, report)
    assert deploy.ok and report.locks.stopping
    assert "WARNING (local: the budget only warns)" in deploy.text()
    # a rehearsal on another major than the target's is stated at the top of the plan
    assert "(on PostgreSQL 15, production runs 16)" in deploy.summary()
    assert "measured on 15, production runs 16" in deploy.to_markdown()
