"""A team's own files through the `migrate` flow, unedited: every way a run ends at lint or at the
rehearsal says why in its last line and in the `migration-plan` artifact (docs/adoption.md)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from flowruns import applied, artifacts, use_models_ahead
from helpers import apply_pending, query, schema_dump
from prefect import flow

from dbcore.backup.dump import backup_to_s3
from dbcore.connection import Env, Target
from dbcore.deploy.recovery import schema_snapshot
from dbcore.deploy.run import DeployRun, RunOptions
from dbcore.deploy.steps import ApprovedChange
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import plan_apply
from flows.migrate import migrate
from flows.rollback import rollback_after_failed_apply

LEGACY = """\
    def migrate(migrator, database, fake=False, **kwargs):
        with database.atomic():
            migrator.sql("CREATE TABLE legacy_t (id int)")
            migrator.sql("INSERT INTO legacy_t VALUES (1), (2)")


    def rollback(migrator, database, fake=False, **kwargs):
        migrator.sql("DROP TABLE legacy_t")
    """


@pytest.fixture
def team(flow_env, db_url, tmp_path, monkeypatch) -> Path:
    """A team's folder with 001 applied (legacy_t, two rows), run as `python flows/migrate.py --env local`."""
    folder = tmp_path / "team_migrations"
    folder.mkdir()
    (folder / "001_legacy.py").write_text(textwrap.dedent(LEGACY))
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(folder))
    monkeypatch.delenv("MIGRATE_MODELS")  # the team's app has no models in this test
    apply_pending(Target(Env.LOCAL, db_url), flow_env.model_copy(update={"migrations_dir": folder}))
    return folder


def add(folder: Path, name: str, source: str) -> None:
    (folder / name).write_text(textwrap.dedent(source))


def plan_of(state) -> str:
    return artifacts(state.state_details.flow_run_id)["migration-plan"]


def test_a_file_that_declares_allow_destructive_goes_through_the_flow(team, db_url):
    add(team, "002_drop_legacy.py", """\
        allow_destructive = True  # legacy_t is unused since v2, agreed in #12


        def migrate(migrator, database, fake=False, **kwargs):
            with database.atomic():
                migrator.sql("DROP TABLE IF EXISTS legacy_t")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TABLE legacy_t (id int)")
        """)
    state = migrate(return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "applied 1: 002_drop_legacy"
    assert query(db_url, "SELECT to_regclass('legacy_t')") == [(None,)]
    plan = plan_of(state)
    assert "Rehearsal on a copy passed" in plan
    assert "| warning | DM003 | `" in plan and "002_drop_legacy.py:6` | DROP TABLE legacy_t destroys its data " \
                                              "(allowed explicitly)" in plan
    assert "DS107" not in plan  # the savepoints of database.atomic() are the product's own


def _ends(team, db_url, source: str):
    add(team, "002_next.py", source)
    before = schema_dump(db_url)
    state = migrate(return_state=True)
    assert state.is_failed()
    assert schema_dump(db_url) == before and applied(db_url) == ["001_legacy"]
    return state, plan_of(state)


def test_a_lint_error_is_in_the_last_line_and_in_the_plan(team, db_url):
    state, plan = _ends(team, db_url, """\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("DROP TABLE legacy_t")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TABLE legacy_t (id int)")
        """)
    assert state.message.startswith("failed at lint, nothing changed: 1 error(s), 0 warning(s)")
    assert "002_next.py:2: error DM003 DROP TABLE legacy_t destroys its data" in state.message
    assert "What stops this run" in plan and "002_next.py:2: error DM003" in plan


def test_a_finding_only_the_rehearsal_sees_is_in_the_last_line_and_in_the_plan(team, db_url):
    state, plan = _ends(team, db_url, """\
        def statement():
            return "DROP TABLE legacy_t"


        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql(statement())


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TABLE legacy_t (id int)")
        """)
    assert state.message.startswith("failed at rehearsal, nothing changed: rehearsal on a copy: ")
    assert "002_next.py:6: error DM003 DROP TABLE legacy_t destroys its data" in state.message
    assert state.message.endswith("all of it in the migration-plan artifact")
    stops = plan.split("### What stops this run")[1].split("###")[0]
    assert "002_next.py:6: error DM003" in stops
    assert "Rehearsal on a copy **failed**" in plan


def test_a_migration_failing_on_the_copy_is_in_the_last_line_and_in_the_plan(team, db_url):
    state, plan = _ends(team, db_url, """\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("ALTER TABLE no_such_table ADD COLUMN x int")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("ALTER TABLE no_such_table DROP COLUMN x")
        """)
    assert state.message.startswith("failed at rehearsal, nothing changed: rehearsal on a copy failed")
    assert "no_such_table" in state.message and "002_next" in state.message
    assert "### Rehearsal on a copy failed" in plan and "no_such_table" in plan


def test_post_checks_failing_on_the_copy_are_in_the_last_line_and_in_the_plan(
        flow_env, db_url, monkeypatch, tmp_path):
    use_models_ahead(monkeypatch, tmp_path)
    apply_pending(Target(Env.LOCAL, db_url), flow_env, upto="003")
    before = schema_dump(db_url)
    state = migrate(return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at rehearsal, nothing changed: post-checks on the copy "
                                    "failed: ")
    assert "sourcedir.language" in state.message
    plan = plan_of(state)
    assert "post-checks on the copy failed" in plan.split("### What stops this run")[1]
    assert schema_dump(db_url) == before


def test_the_rollback_subflow_goes_straight_to_the_restore_for_an_empty_rollback(team, flow_env, db_url):
    add(team, "002_enum.py", """\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TYPE mood AS ENUM ('ok', 'sad')")
            migrator.sql("CREATE TABLE diary (id serial PRIMARY KEY, mood mood)")


        def rollback(migrator, database, fake=False, **kwargs):
            pass
        """)
    cfg = flow_env.model_copy(update={"migrations_dir": team})
    target = Target(Env.LOCAL, db_url)
    backup = backup_to_s3(target, cfg)
    before = schema_snapshot(target)
    apply_pending(target, cfg)

    @flow
    def after_a_failed_apply():
        run = DeployRun(target, cfg, "fedcba654321", RunOptions(approval_timeout=60))
        approved = ApprovedChange(plan_apply(target, cfg), None, backup.key, None, before, None,
                                  ApprovalRecord(None, None, "f" * 16))
        return rollback_after_failed_apply(run, ["002_enum"], approved)

    how = after_a_failed_apply()
    assert how.startswith(f"restoring backup {backup.key}")
    assert schema_snapshot(target) == before  # the type and the table are gone with the restore
    assert applied(db_url) == ["001_legacy"]
    kept = query(db_url, "SELECT datname FROM pg_database WHERE datname LIKE %s",
                 (target.dbname + "_failed_%",))
    for (name,) in kept:  # the broken database, kept for inspection: not left to later tests
        query(db_url.rsplit("/", 1)[0] + "/postgres", f'DROP DATABASE "{name}"')
