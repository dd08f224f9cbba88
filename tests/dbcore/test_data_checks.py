"""The team's own checks of the data: verify() in a migration, migrations/checks/*.sql, and
MIGRATE_VERIFY_COMMAND; what a failure shows (count, at most five primary keys, nothing else)."""

from __future__ import annotations

import sys
import textwrap

import pytest
from data_check_helpers import add_failing_check, seed_projects
from helpers import apply_pending, query

from dbcore.checks.data import DataChecks, run_verify_command
from dbcore.checks.post import run_post_checks
from dbcore.deploy.rehearsal import rehearse_on_copy
from dbcore.migrate.plan import plan_apply


@pytest.fixture
def staged(target, settings, migrations_dir, db_url):
    cfg = settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, cfg)
    seed_projects(db_url)
    return cfg


def _keys(url: str) -> list[str]:
    return [str(r[0]) for r in query(url, "SELECT id FROM project WHERE name LIKE 'draft%' ORDER BY id")]


@pytest.mark.parametrize("kind", ["verify", "sql"])
def test_a_failing_check_names_itself_the_count_and_primary_keys_only(kind, staged, target, db_url,
                                                                      migrations_dir):
    add_failing_check(migrations_dir, kind)
    apply_pending(target, staged)
    data = DataChecks.of(staged, [migrations_dir / "005_clear_draft_slugs.py"], rehearsal=False)
    report = run_post_checks(target, None, data=data)
    assert not report.ok
    [failure] = report.data.failures
    name = "005_clear_draft_slugs.py verify()" if kind == "verify" else "checks/project_slug_filled.sql"
    assert failure == (f"check {name} (every project has a slug) failed: 2 offending row(s); "
                       f"primary keys {', '.join(_keys(db_url))}")
    everything = report.text() + report.to_markdown() + str(report.to_dict())
    assert "secret" not in everything  # the names of the offending rows never leave the database


def test_passing_checks_pass_and_more_than_five_keys_are_cut(staged, target, db_url, migrations_dir):
    add_failing_check(migrations_dir, "sql")
    data = DataChecks.of(staged, [], rehearsal=False)
    assert run_post_checks(target, None, data=data).ok  # nothing has emptied a slug yet
    query(db_url, "INSERT INTO project (name, created_at, updated_at) SELECT 'p' || g, now(), now() "
                  "FROM generate_series(1, 9) g")
    [result] = data.run(target).results
    assert result.offending == 9 and len(result.keys) == 5
    assert result.describe().endswith(", ...")


def test_what_a_check_may_not_show_or_do(staged, target, migrations_dir):
    checks = migrations_dir / "checks"
    checks.mkdir()
    # a first column that is not a primary key: the count only
    (checks / "names.sql").write_text("SELECT name FROM project WHERE name LIKE 'draft%'")
    (checks / "broken.sql").write_text("SELECT id FROM no_such_table")
    (migrations_dir / "005_noop.py").write_text(textwrap.dedent('''\
        def migrate(migrator, database, *, fake=False):
            pass

        def rollback(migrator, database, *, fake=False):
            pass

        def verify(database):
            name = database.execute_sql("SELECT name FROM project ORDER BY id LIMIT 1").fetchone()[0]
            database.execute_sql("DELETE FROM project")  # a check never writes
            assert False, name
        '''))
    (migrations_dir / "006_assert.py").write_text(textwrap.dedent('''\
        def migrate(migrator, database, *, fake=False):
            pass

        def rollback(migrator, database, *, fake=False):
            pass

        def verify(database):
            name = database.execute_sql("SELECT name FROM project ORDER BY id LIMIT 1").fetchone()[0]
            assert name == "nothing like it", f"found {name}"
        '''))
    data = DataChecks.of(staged, [migrations_dir / "005_noop.py", migrations_dir / "006_assert.py"],
                         rehearsal=False)
    report = data.run(target)
    lines = {r.name: r.describe() for r in report.results}
    assert "offending" not in lines["005_noop.py verify()"]
    assert "refused its query (SQLSTATE 25006) at 005_noop.py:9" in lines["005_noop.py verify()"]
    assert "raised AssertionError at 006_assert.py:9" in lines["006_assert.py verify()"]
    assert lines["checks/names.sql"].endswith("2 offending row(s); its first column is not a "
                                              "primary key, so no value is shown")
    assert "its query failed (SQLSTATE 42P01)" in lines["checks/broken.sql"]
    assert "secret" not in str(report.to_dict())
    assert query(target.url, "SELECT count(*) FROM project") == [(3,)]  # nothing was deleted


def test_the_verify_command_gets_the_copy_and_a_time_limit(target, tmp_path):
    script = tmp_path / "smoke.py"
    script.write_text("import os, sys, time\n"
                      "if sys.argv[1] == 'sleep': time.sleep(60)\n"
                      f"sys.exit(0 if os.environ['DATABASE_URL'] == {target.url!r} else 3)\n")
    ok = run_verify_command(f"{sys.executable} {script} check", target, 30)
    assert ok.ok and "passed" in ok.describe()
    other = run_verify_command(f"{sys.executable} {script} check",
                               target.with_dbname("elsewhere"), 30)
    assert other.returncode == 3 and "failed (exit 3" in other.describe()
    slow = run_verify_command(f"{sys.executable} {script} sleep", target, 1)
    assert slow.returncode is None and "did not finish within its time limit" in slow.describe()
    missing = run_verify_command("no-such-program-here postgres://app:hunter2@db/x", target, 5)
    assert not missing.ok and "cannot start it" in missing.describe()
    assert "hunter2" not in missing.describe() and "app:***@db" in missing.describe()


@pytest.mark.parametrize("kind", ["verify", "sql"])
def test_a_failing_check_fails_the_rehearsal_on_the_copy(kind, target, s3_settings, migrations_dir,
                                                         db_url):
    from dbcore.backup.dump import backup_to_s3

    cfg = s3_settings.model_copy(update={"migrations_dir": migrations_dir})
    apply_pending(target, cfg)
    seed_projects(db_url)
    add_failing_check(migrations_dir, kind)
    plan = plan_apply(target, cfg)
    report = rehearse_on_copy(plan, target, cfg, backup_to_s3(target, cfg).key)
    assert not report.ok
    assert "2 offending row(s); primary keys" in report.problem()
    assert query(db_url, "SELECT count(*) FROM project WHERE slug IS NULL") == [(0,)]  # live untouched


def test_the_verify_command_runs_in_the_rehearsal(target, s3_settings, migrations_dir, db_url, tmp_path):
    from dbcore.backup.dump import backup_to_s3

    script = tmp_path / "smoke.py"
    script.write_text("import os, sys\nsys.exit(0 if '_rehearsal_' in os.environ['DATABASE_URL'] else 4)\n")
    cfg = s3_settings.model_copy(update={"migrations_dir": migrations_dir,
                                         "verify_command": f"{sys.executable} {script}"})
    apply_pending(target, cfg, upto="003")
    plan = plan_apply(target, cfg)
    report = rehearse_on_copy(plan, target, cfg, backup_to_s3(target, cfg).key)
    assert report.ok and report.checks.data.command.ok
    bad = cfg.model_copy(update={"verify_command": f"{sys.executable} -c 'import sys; sys.exit(5)'"})
    report = rehearse_on_copy(plan, target, bad, backup_to_s3(target, bad).key)
    assert not report.ok and "failed (exit 5" in report.problem()


def test_the_lint_lets_verify_read_with_execute_sql(tmp_path):
    from dbcore.lint.engine import lint_file

    path = tmp_path / "001_reads.py"
    path.write_text(textwrap.dedent('''\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("UPDATE project SET slug = lower(name) WHERE slug IS NULL")

        def rollback(migrator, database, *, fake=False):
            migrator.sql("UPDATE project SET slug = NULL WHERE slug = lower(name)")

        def verify(database):
            return database.execute_sql("SELECT id FROM project WHERE slug IS NULL").fetchall()
        '''))
    assert [f.rule for f in lint_file(path)] == []  # DM001 is not about verify()
    path.write_text(path.read_text().replace(
        'migrator.sql("UPDATE', 'database.execute_sql("UPDATE', 1))  # in migrate(): flagged
    assert [f.rule for f in lint_file(path)] == ["DM001"]
