"""A team adopts dbmigrate with its own files, unedited (docs/adoption.md): what they see, and the database after.

Our own migrations in the styles real projects write: bodies wrapped in the guide's
``database.atomic()``, ``allow_destructive`` files, a dropped column that holds values, a list passed
to ``drop_columns``, a callable ``MIGRATE_MODELS``, an empty ``rollback()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import REPO, apply_pending, query

from dbcore.backup.dump import backup_to_s3
from dbcore.checks.post import load_models
from dbcore.deploy.plan import DeployPlan
from dbcore.deploy.rehearsal import rehearse_on_copy
from dbcore.errors import ConfigError, MigrationFailed, RollbackRefused
from dbcore.lint.engine import lint_pending
from dbcore.migrate.plan import plan_apply, plan_rollback

LEGACY = '''\
import peewee as pw


class Legacy(pw.Model):
    name = pw.TextField(null=True)
    old_col = pw.TextField(null=True)

    class Meta:
        table_name = "legacy_t"


def migrate(migrator, database, fake=False, **kwargs):
    migrator.create_model(Legacy)
    migrator.sql("INSERT INTO legacy_t (name, old_col) VALUES ('a', 'kept'), ('b', NULL), ('c', 'x')")


def rollback(migrator, database, fake=False, **kwargs):
    migrator.remove_model(Legacy)
'''


def write(folder: Path, name: str, source: str) -> Path:
    path = folder / name
    path.write_text(textwrap.dedent(source))
    return path


def dbmigrate(folder: Path, url: str, *args: str, env: dict | None = None):
    full = {k: v for k, v in os.environ.items() if k not in ("FLY_APP_NAME", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY")}
    full.update({"DATABASE_URL": url, "MIGRATE_MIGRATIONS_DIR": str(folder), **(env or {})})
    return subprocess.run([sys.executable, "-m", "dbcore.cli", *args], capture_output=True, text=True,
                          env=full, cwd=REPO, timeout=120)


def columns(url: str, table: str) -> list[str]:
    return [r[0] for r in query(url, "SELECT column_name FROM information_schema.columns WHERE "
                                     "table_name = %s ORDER BY ordinal_position", (table,))]


@pytest.fixture
def folder(settings) -> Path:
    settings.migrations_dir.mkdir()
    write(settings.migrations_dir, "001_legacy.py", LEGACY)
    return settings.migrations_dir


# -- the guide's database.atomic() ----------------------------------------------------------------

ATOMIC = '''\
import peewee as pw


def migrate(migrator, database, fake=False, **kwargs):
    with database.atomic():
        migrator.sql("CREATE TABLE wrapped (id serial PRIMARY KEY, note text)")
        migrator.sql("INSERT INTO wrapped (note) VALUES ('inside the savepoint')")
    with database.transaction():
        migrator.sql("ALTER TABLE wrapped ADD COLUMN extra text")


def rollback(migrator, database, fake=False, **kwargs):
    with database.atomic():
        migrator.sql("DROP TABLE wrapped")
'''


def test_a_body_wrapped_in_database_atomic_is_accepted_and_rolls_back_with_the_batch(
        folder, target, settings, db_url):
    write(folder, "002_wrapped.py", ATOMIC)
    report = lint_pending(folder, sorted(folder.glob("*.py")))
    assert report.ok and not [f for f in report.findings if f.rule in ("DM010", "DS107")], report.text()

    # a later migration of the same batch fails: the savepoint goes with the whole batch
    write(folder, "003_fails.py", '''\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("SELECT * FROM no_such_table")

        def rollback(migrator, database, fake=False, **kwargs):
            pass
        ''')
    with pytest.raises(MigrationFailed, match="nothing was changed"):
        apply_pending(target, settings)
    assert query(db_url, "SELECT to_regclass('wrapped'), to_regclass('legacy_t')") == [(None, None)]

    (folder / "003_fails.py").unlink()
    apply_pending(target, settings)
    assert query(db_url, "SELECT note, extra FROM wrapped") == [("inside the savepoint", None)]


def test_an_app_database_imported_by_the_file_is_still_an_error(folder):
    path = write(folder, "002_app_db.py", '''\
        from app.models import db


        def migrate(migrator, database, fake=False, **kwargs):
            with db.atomic():
                migrator.sql("CREATE TABLE x (id int)")
            database.commit()


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("DROP TABLE x")
        ''')
    found = {(f.rule, f.line) for f in lint_pending(folder, [path]).errors}
    assert found == {("DM010", 5), ("DM010", 7)}


# -- one judgement: the static lint and the rehearsal agree, with the file's own allows -------------

@pytest.fixture
def rehearse(target, s3_settings, folder):
    """Apply 001, then rehearse the pending files on a copy; return the plan the approver reads."""
    cfg = s3_settings.model_copy(update={"migrations_dir": folder})
    apply_pending(target, cfg, upto="001")

    def run(allow_destructive: bool = False) -> DeployPlan:
        plan = plan_apply(target, cfg)
        lint = lint_pending(folder, [m.path for m in plan.migrations], allow_destructive=allow_destructive)
        backup = backup_to_s3(target, cfg)
        report = rehearse_on_copy(plan, target, cfg, backup.key, allow_destructive=allow_destructive)
        return DeployPlan("local", plan, lint, backup, report)

    return run


@pytest.mark.parametrize("allow", ["allow_destructive = True", "", "marker"])
def test_a_drop_allowed_by_the_file_passes_the_rehearsal_too(rehearse, folder, allow, db_url):
    line = 'migrator.sql("DROP TABLE IF EXISTS legacy_t")'
    if allow == "marker":
        line += "  # dbmigrate: allow DM003"
    write(folder, "002_drop_legacy.py", f'''\
{allow if allow != "marker" else ""}

def migrate(migrator, database, fake=False, **kwargs):
    with database.atomic():
        {line}


def rollback(migrator, database, fake=False, **kwargs):
    migrator.sql("CREATE TABLE legacy_t (id serial PRIMARY KEY, name text, old_col text)")
''')
    deploy = rehearse()
    findings = [f for f in deploy.rehearsal.sql_findings if f.rule == "DM003"]
    # the rehearsal's finding points at the migrator call in the file, as the static lint's does
    assert [(Path(f.file).name, f.line) for f in findings] == [("002_drop_legacy.py", 5)]
    assert not [f for f in deploy.rehearsal.sql_findings if f.rule == "DS107"]  # our own savepoints
    if allow:
        assert deploy.ok and findings[0].severity == "warning"
        assert deploy.stops() == []
    else:
        assert not deploy.ok and deploy.lint.errors[0].line == 5
        assert "002_drop_legacy.py:5: error DM003" in deploy.stop_reason()
        assert "002_drop_legacy.py:5" in deploy.to_markdown().split("### Migrations")[0]
    assert query(db_url, "SELECT count(*) FROM legacy_t") == [(3,)]  # the live database: untouched


def test_sql_the_lint_cannot_read_is_judged_on_the_copy_at_its_line(rehearse, folder):
    write(folder, "002_dynamic.py", '''\
        def statement():
            return "DROP TABLE legacy_t"


        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql(statement())


        def rollback(migrator, database, fake=False, **kwargs):
            pass
        ''')
    deploy = rehearse()
    assert deploy.lint.ok  # a warning: it cannot read the SQL
    assert not deploy.ok
    reason = deploy.stop_reason()
    assert reason.startswith("rehearsal on a copy: ") and "002_dynamic.py:6: error DM003" in reason
    assert "002_dynamic.py` line" not in reason and "migration-plan artifact" in reason
    assert "002_dynamic.py:6: error DM003" in deploy.text()
    # the same finding is shown once to the approver (lint and rehearsal agree on where)
    assert deploy.to_markdown().count("DROP TABLE legacy_t destroys its data") == 2  # stops + table


# -- data loss is visible and deliberate ------------------------------------------------------------

DROP_COLUMN = '''\
import peewee as pw
{allow}

class Legacy(pw.Model):
    name = pw.TextField(null=True)
    old_col = pw.TextField(null=True)

    class Meta:
        table_name = "legacy_t"


def migrate(migrator, database, fake=False, **kwargs):
    migrator.drop_columns(Legacy, "old_col")


def rollback(migrator, database, fake=False, **kwargs):
    migrator.add_columns(Legacy, old_col=pw.TextField(null=True))
'''


def test_a_dropped_column_needs_the_allow_and_the_plan_counts_its_values(rehearse, folder, db_url):
    write(folder, "002_drop_old_col.py", DROP_COLUMN.format(allow=""))
    stopped = lint_pending(folder, [folder / "002_drop_old_col.py"])
    assert [(f.rule, f.line) for f in stopped.errors] == [("DM003", 13)]
    assert "dropping column legacy_t.old_col destroys its values" in stopped.errors[0].message

    write(folder, "002_drop_old_col.py", DROP_COLUMN.format(allow="allow_destructive = True  # agreed in #12"))
    deploy = rehearse()
    assert deploy.ok, deploy.stop_reason()
    [dropped] = deploy.rehearsal.dropped_columns
    assert (dropped.table, dropped.column, dropped.values, dropped.line) == ("legacy_t", "old_col", 2, 13)
    assert "`legacy_t.old_col`: **2** non-null value(s) on the copy" in deploy.to_markdown()
    assert "column dropped: legacy_t.old_col: 2 non-null value(s) on the copy" in deploy.text()
    assert columns(db_url, "legacy_t") == ["id", "name", "old_col"]  # only the copy lost it


def test_a_list_passed_to_drop_columns_is_an_error_naming_both_readings(folder, target, settings, db_url):
    write(folder, "002_drop_list.py", '''\
        import peewee as pw

        allow_destructive = True


        class Legacy(pw.Model):
            old_col = pw.TextField(null=True)

            class Meta:
                table_name = "legacy_t"


        def migrate(migrator, database, fake=False, **kwargs):
            migrator.drop_columns(Legacy, ["old_col"])


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.add_columns(Legacy, old_col=pw.TextField(null=True))
        ''')
    refused = dbmigrate(folder, db_url, "apply")
    assert refused.returncode == 1
    last = refused.stderr.strip().splitlines()[-1]
    assert last.startswith("dbmigrate: error: lint: 1 error(s)") and "nothing was applied" in last
    assert "DM012" in last and "drops nothing" in last and "drops each column listed" in last
    assert query(db_url, "SELECT to_regclass('legacy_t')") == [(None,)]

    # history written by pw_migrate: 001 ran, 002 "ran" and dropped nothing (its reading)
    apply_pending(target, settings, upto="001")
    query(db_url, "INSERT INTO migratehistory (name, migrated_at) VALUES ('002_drop_list', now())")
    write(folder, "003_rename.py", '''\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.rename_field("legacy_t", "old_col", "kept_col")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.rename_field("legacy_t", "kept_col", "old_col")
        ''')
    # the replay describes the schema the database has: old_col is still there
    applied = dbmigrate(folder, db_url, "apply")
    assert applied.returncode == 0, applied.stderr
    assert columns(db_url, "legacy_t") == ["id", "name", "kept_col"]
    assert query(db_url, "SELECT count(kept_col) FROM legacy_t") == [(2,)]


def test_a_field_the_files_class_lacks_is_an_error_on_a_pending_file(folder):
    path = write(folder, "002_drop_unknown.py", '''\
        import peewee as pw

        allow_destructive = True


        class Legacy(pw.Model):
            name = pw.TextField(null=True)

            class Meta:
                table_name = "legacy_t"


        def migrate(migrator, database, fake=False, **kwargs):
            migrator.drop_columns(Legacy, "old_col")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("ALTER TABLE legacy_t ADD COLUMN old_col text")
        ''')
    [error] = lint_pending(folder, [path]).errors
    assert (error.rule, error.line) == ("DM012", 14)
    assert "skips it and drops nothing" in error.message and "dbmigrate drops column old_col" in error.message


# -- the CLI judges as the flow does -----------------------------------------------------------------

def test_dbmigrate_apply_and_plan_lint_with_the_flows_rules(folder, db_url):
    write(folder, "002_drop_legacy.py", '''\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("DROP TABLE legacy_t")


        def rollback(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TABLE legacy_t (id int)")
        ''')
    assert dbmigrate(folder, db_url, "apply", "--target", "001").returncode == 0
    plan = dbmigrate(folder, db_url, "plan")
    assert plan.returncode == 1 and "002_drop_legacy.py:2: error DM003" in plan.stdout
    refused = dbmigrate(folder, db_url, "apply")
    assert refused.returncode == 1 and "002_drop_legacy.py:2: error DM003" in refused.stderr
    assert query(db_url, "SELECT count(*) FROM legacy_t") == [(3,)]
    assert dbmigrate(folder, db_url, "plan", "--allow-destructive").returncode == 0
    allowed = dbmigrate(folder, db_url, "apply", "--allow-destructive")
    assert allowed.returncode == 0, allowed.stderr
    assert "warning DM003" in allowed.stderr and "applied 1 migration(s)" in allowed.stdout
    assert query(db_url, "SELECT to_regclass('legacy_t')") == [(None,)]


# -- MIGRATE_MODELS ----------------------------------------------------------------------------------

def test_migrate_models_takes_a_list_a_callable_or_a_module(tmp_path, monkeypatch):
    write(tmp_path, "app_models.py", '''\
        import peewee as pw
        from dbcore.models import Project  # imported: not this module's


        class BaseModel(pw.Model):
            pass


        class Author(BaseModel):
            name = pw.TextField()


        class Book(BaseModel):
            title = pw.TextField()


        MODELS = (Author, Book)


        def get_models():
            return [Author, Book]


        def broken():
            raise RuntimeError("no config")


        NOT_MODELS = ["author"]
        ''')
    monkeypatch.syspath_prepend(str(tmp_path))
    names = lambda spec: sorted(m.__name__ for m in load_models(spec))  # noqa: E731
    assert names("app_models:MODELS") == names("app_models:get_models") == ["Author", "Book"]
    assert names("app_models") == ["Author", "Book"]  # not BaseModel, not the imported Project
    for spec, why in [("app_models:NOT_MODELS", "is a list, not a list of peewee models"),
                      ("app_models:broken", "broken() raised RuntimeError: no config"),
                      ("app_models:nothing", "app_models has no nothing"),
                      ("no_such_app:MODELS", "cannot import no_such_app"),
                      ("app_models:", "is not a model reference")]:
        with pytest.raises(ConfigError) as info:
            load_models(spec)
        message = str(info.value)
        assert f"MIGRATE_MODELS={spec!r}" in message and why in message and "\n" not in message
        assert "module:NAME" in message or "PYTHONPATH" in message

    # what the user sees: one line, no traceback
    env = {"PYTHONPATH": str(tmp_path), "MIGRATE_MODELS": "app_models:broken"}
    checked = dbmigrate(tmp_path, "postgres://u@127.0.0.1:1/app", "check", env=env)
    assert checked.returncode == 2 and "Traceback" not in checked.stderr
    assert checked.stderr.strip() == ("dbmigrate: error: MIGRATE_MODELS='app_models:broken': broken() "
                                      "raised RuntimeError: no config: give module:NAME (NAME a list or "
                                      "tuple of peewee models, or a function returning one) or a bare "
                                      "module (the models defined in it that have a table)")


# -- rolling back what a rollback() cannot undo --------------------------------------------------------

def test_an_empty_rollback_is_refused_and_force_says_what_stays(folder, target, settings, db_url):
    write(folder, "002_enum.py", '''\
        def migrate(migrator, database, fake=False, **kwargs):
            migrator.sql("CREATE TYPE mood AS ENUM ('ok', 'sad')")
            migrator.sql("CREATE TABLE diary (id serial PRIMARY KEY, mood mood)")


        def rollback(migrator, database, fake=False, **kwargs):
            pass
        ''')
    apply_pending(target, settings)
    with pytest.raises(RollbackRefused, match="002_enum.py has an empty rollback"):
        plan_rollback(target, settings, count=2)

    refused = dbmigrate(folder, db_url, "rollback", "--count", "2")
    assert refused.returncode == 1
    assert "002_enum.py has an empty rollback()" in refused.stderr
    assert "write its rollback(), or restore a backup" in refused.stderr
    assert query(db_url, "SELECT name FROM migratehistory ORDER BY id") == [("001_legacy",), ("002_enum",)]
    assert query(db_url, "SELECT to_regclass('diary'), to_regclass('legacy_t') IS NOT NULL") == [("diary", True)]

    forced = dbmigrate(folder, db_url, "rollback", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "--force: rollback() of 002_enum.py undoes nothing" in forced.stderr
    assert "stays in the database" in forced.stderr
    assert query(db_url, "SELECT name FROM migratehistory") == [("001_legacy",)]
    assert query(db_url, "SELECT to_regclass('diary')") == [("diary",)]  # what --force said stays
