"""`dbmigrate` as a person runs it: exit codes, one-line errors, JSON, no passwords."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import query, schema_dump

DBMIGRATE = [sys.executable, "-m", "dbcore.cli"]


def dbmigrate(*args: str, env: dict | None = None, cwd: Path | None = None):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("DATABASE_URL", "FLY_APP_NAME", "USE_FLY_POSTGRES_FROM_LOCAL_PROXY")}
    full_env.update(env or {})
    return subprocess.run([*DBMIGRATE, *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=120)


@pytest.fixture
def secret_url(db_url):
    """The test database's URL with a password in it (trust auth ignores it; the CLI must hide it)."""
    return db_url.replace("postgres@", "postgres:Sup3rSecretPw@")


def test_apply_then_rollback_through_the_cli(secret_url, migrations_dir, db_url):
    env = {"DATABASE_URL": secret_url}
    applied = dbmigrate("--migrations-dir", str(migrations_dir), "apply", env=env)
    assert applied.returncode == 0, applied.stderr
    assert "applied 4 migration(s)" in applied.stdout
    assert "[4/4] 004_fix_sourcedir_language done" in applied.stderr

    status = dbmigrate("status", "--json", "--migrations-dir", str(migrations_dir), env=env)
    rows = json.loads(status.stdout)
    assert [r["name"] for r in rows][:1] == ["001_initial_schema"]
    assert all(r["applied"] and not r["changed"] and r["applied_at"] for r in rows)
    assert {"name", "applied", "applied_at", "changed"} <= set(rows[0])

    rolled = dbmigrate("rollback", "--count", "4", "--migrations-dir", str(migrations_dir), env=env)
    assert rolled.returncode == 0, rolled.stderr
    assert query(db_url, "SELECT count(*) FROM pg_tables WHERE tablename IN "
                         "('project', 'sourcedir', 'document')") == [(0,)]
    for out in (applied, status, rolled):
        assert "Sup3rSecretPw" not in out.stdout + out.stderr


def test_a_failing_migration_exits_1_with_one_line_and_no_password(secret_url, migrations_dir,
                                                                    db_url):
    (migrations_dir / "005_bad.py").write_text(textwrap.dedent("""\
        def migrate(migrator, database, *, fake=False):
            migrator.sql("ALTER TABLE nope ADD COLUMN x int")

        def rollback(migrator, database, *, fake=False):
            pass
        """))
    before = schema_dump(db_url)
    result = dbmigrate("apply", "--migrations-dir", str(migrations_dir),
                       env={"DATABASE_URL": secret_url})
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("dbmigrate: error: apply of 005_bad failed") and "nope" in last
    assert "Traceback" not in result.stderr and "Sup3rSecretPw" not in result.stderr
    assert schema_dump(db_url) == before


def test_unreachable_database_is_one_line_without_the_password():
    result = dbmigrate("status", env={"DATABASE_URL": "postgres://app:Sup3rSecretPw@127.0.0.1:1/app"})
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "cannot connect to postgres://app:***@127.0.0.1:1/app" in result.stderr
    assert "Sup3rSecretPw" not in result.stderr


def test_configuration_errors_exit_2(tmp_path, db_url):
    contradiction = dbmigrate("--env", "production", "status", env={"DATABASE_URL": db_url})
    assert contradiction.returncode == 2
    assert "--env production contradicts the environment" in contradiction.stderr

    missing = dbmigrate("status", env={"FLY_APP_NAME": "myapp"})
    assert missing.returncode == 2 and "DATABASE_URL is not set" in missing.stderr

    no_folder = dbmigrate("status", "--migrations-dir", str(tmp_path / "nope"),
                          env={"DATABASE_URL": db_url})
    assert no_folder.returncode == 2 and "does not exist" in no_folder.stderr

    usage = dbmigrate("rollback", "--count", "many")
    assert usage.returncode == 2


def test_syntax_error_names_the_file_and_verbose_shows_the_traceback(db_url, migrations_dir):
    (migrations_dir / "005_oops.py").write_text("def migrate(migrator, database:\n    pass\n")
    env = {"DATABASE_URL": db_url}
    quiet = dbmigrate("apply", "--migrations-dir", str(migrations_dir), env=env)
    assert quiet.returncode == 1
    assert "005_oops.py has a syntax error at line 1" in quiet.stderr
    assert "Traceback" not in quiet.stderr
    loud = dbmigrate("apply", "--verbose", "--migrations-dir", str(migrations_dir), env=env)
    assert "Traceback" in loud.stderr


def test_new_writes_the_next_numbered_file(migrations_dir):
    result = dbmigrate("new", "Add user email!", "--migrations-dir", str(migrations_dir))
    assert result.returncode == 0
    assert Path(result.stdout.strip()).name == "005_add_user_email.py"
    assert (migrations_dir / "005_add_user_email.py").exists()


@pytest.mark.parametrize("url", [
    "postgres://app@127.0.0.1:1/app?password=Sup3rSecretPw",
    "host=127.0.0.1 port=1 user=app password=Sup3rSecretPw dbname=app",
    "postgres://app:Sup3rSecretPw@127.0.0.1:notaport/app",
])
def test_no_form_of_database_url_shows_its_password(url):
    result = dbmigrate("status", env={"DATABASE_URL": url})
    assert result.returncode in (1, 2)
    assert result.stderr.count("\n") == 1 and "Sup3rSecretPw" not in result.stderr


def test_a_dry_run_on_production_needs_on_live(db_url):
    env = {"DATABASE_URL": db_url, "FLY_APP_NAME": "myapp"}
    result = dbmigrate("apply", "--dry-run", env=env)
    assert result.returncode == 2 and "rehearse on a copy" in result.stderr


def test_apply_on_production_needs_an_approver_and_backs_up_first(db_url, migrations_dir,
                                                                  s3_settings):
    from dbcore.backup.dump import list_backups

    env = {"DATABASE_URL": db_url, "FLY_APP_NAME": "myapp", "MIGRATE_S3_BUCKET": s3_settings.s3_bucket,
           "MIGRATE_S3_ENDPOINT_URL": s3_settings.s3_endpoint_url}
    before = schema_dump(db_url)
    refused = dbmigrate("apply", "--migrations-dir", str(migrations_dir), env=env)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "dbmigrate: error: applying to the production database needs an approval: pass --actor "
        "YOUR_NAME (you approve the plan printed, recorded in migration_audit), or run the flow "
        "and approve in Prefect")
    assert schema_dump(db_url) == before and list_backups(s3_settings) == []

    applied = dbmigrate("apply", "--actor", "Ada", "--migrations-dir", str(migrations_dir), env=env)
    assert applied.returncode == 0, applied.stderr
    backups = list_backups(s3_settings)
    assert len(backups) == 1 and backups[0].last_migration == "none" and backups[0].env == "production"
    assert f"backup before the change (verified): {backups[0].key}" in applied.stderr
    assert "applied 4 migration(s)" in applied.stdout
    assert query(db_url, "SELECT DISTINCT actor FROM migration_audit") == [("Ada",)]
