"""Every verb that changes a live database obeys one policy (dbcore/deploy/policy.py): `rollback`,
`baseline` and `restore` on production need --actor, something to go back to (a verified backup,
or the replaced database kept renamed), and leave a record that survives the change."""

from __future__ import annotations

import pytest
from helpers import apply_pending, query, schema_dump

from dbcore.backup.dump import backup_to_s3, list_backups
from dbcore.backup.storage import head, open_storage
from dbcore.cli.main import main as dbmigrate
from dbcore.connection import Env, Target

TABLES = "SELECT count(*) FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'migratehistory'"


@pytest.fixture
def production(db_url, s3_settings, migrations_dir, monkeypatch):
    """The test database as production (FLY_APP_NAME set), with S3 for its backups."""
    monkeypatch.setenv("FLY_APP_NAME", "myapp")
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(migrations_dir))
    monkeypatch.setenv("MIGRATE_S3_BUCKET", s3_settings.s3_bucket)
    monkeypatch.setenv("MIGRATE_S3_ENDPOINT_URL", s3_settings.s3_endpoint_url)
    return s3_settings.model_copy(update={"migrations_dir": migrations_dir})


def _one_line_refusal(capfd, says: str) -> str:
    """The error is one line (after the plan the command printed), saying ``says``."""
    err = capfd.readouterr().err.strip()
    errors = [line for line in err.splitlines() if line.startswith("dbmigrate: error:")]
    assert len(errors) == 1 and says in errors[0] and err.endswith(errors[0]), err
    return errors[0]


def test_rollback_on_production_needs_an_actor_and_takes_a_verified_backup_first(
        production, db_url, capfd):
    apply_pending(Target(Env.LOCAL, db_url), production)
    before = schema_dump(db_url)
    assert dbmigrate(["rollback", "--count", "4"]) == 2
    _one_line_refusal(capfd, "rolling back the production database needs an approval: pass --actor")
    assert schema_dump(db_url) == before and list_backups(production) == []

    assert dbmigrate(["rollback", "--count", "4", "--actor", "Ada"]) == 0
    assert "backup before the change (verified)" in capfd.readouterr().err
    backups = list_backups(production)
    assert len(backups) == 1 and backups[0].last_migration == "004_fix_sourcedir_language"
    assert query(db_url, "SELECT actor FROM migration_audit WHERE action = 'rollback'")[0] == ("Ada",)


def test_baseline_on_production_needs_an_actor_and_the_tables_its_files_create(
        production, db_url, capfd):
    assert dbmigrate(["baseline", "003"]) == 2
    _one_line_refusal(capfd, "a baseline of the production database needs an approval: pass --actor")
    assert dbmigrate(["baseline", "003", "--actor", "Ada"]) == 2
    _one_line_refusal(capfd, "the marked files create document, project, sourcedir, which the "
                             "database does not have")
    assert query(db_url, "SELECT to_regclass('migratehistory')") == [(None,)]  # history claims nothing

    apply_pending(Target(Env.LOCAL, db_url), production, upto="003")
    query(db_url, "DROP TABLE migratehistory")  # the schema is there, our records are not
    assert dbmigrate(["baseline", "003", "--actor", "Ada"]) == 0
    assert query(db_url, "SELECT count(*) FROM migratehistory") == [(3,)]


def test_restore_over_production_needs_an_actor_keeps_the_replaced_database_and_records_itself(
        production, db_url, pg_server_url, capfd):
    target = Target(Env.LOCAL, db_url)
    apply_pending(target, production, upto="002")
    info = backup_to_s3(target, production, env="production")
    apply_pending(target, production)  # production moved on since the backup
    query(db_url, "INSERT INTO project (name, slug, created_at, updated_at) "
                  "VALUES ('written after the backup', 'late', now(), now())")
    before = schema_dump(db_url)
    dbname = db_url.rsplit("/", 1)[1]

    assert dbmigrate(["restore", info.key, "--into", dbname, "--force", "--allow-production"]) == 2
    _one_line_refusal(capfd, "a restore into the production database needs an approval: pass --actor")
    assert schema_dump(db_url) == before

    assert dbmigrate(["restore", info.key, "--into", dbname, "--force", "--allow-production",
                      "--actor", "Ada"]) == 0
    out = capfd.readouterr().out
    kept = out.split("kept as ")[1].split()[0]
    kept_url = db_url.rsplit("/", 1)[0] + "/" + kept
    # the replaced database, with what was written after the backup, is kept
    assert query(kept_url, "SELECT name FROM project WHERE slug = 'late'") == [("written after the backup",)]
    # the restore is recorded in the restored database and on the backup object
    rows = query(db_url, "SELECT name, actor, comment FROM migration_audit WHERE action = 'restore'")
    assert rows and rows[0][0] == info.key and rows[0][1] == "Ada" and kept in rows[0][2]
    metadata = head(open_storage(production), info.key)["Metadata"]
    assert metadata["restored-by"] == "Ada" and metadata["restored-kept-as"] == kept
    query(pg_server_url, f'DROP DATABASE "{kept}"')
