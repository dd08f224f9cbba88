"""Bad input, to the flow (`python flows/migrate.py`) and to `dbmigrate`: one line naming the
problem and the fix, exit 1 or 2, the database exactly as before.

Covered elsewhere and not repeated here: a malformed DATABASE_URL in every form and a missing
migrations folder for `dbmigrate` (tests/dbcore/test_cli.py), an approval of the wrong type
(tests/e2e/test_production_deployment.py::test_a_malformed_or_empty_answer_never_applies) and
without a name (tests/flows/test_migrate_flow.py).
"""

from __future__ import annotations

import pytest
from helpers import query, schema_dump

from dbcore.cli import main as cli
from flows import migrate as flow_script

RAISES_AT_IMPORT = '''"""005: imports something the app no longer has."""
raise RuntimeError("settings module not found")


def migrate(migrator, database, *, fake=False):
    pass


def rollback(migrator, database, *, fake=False):
    pass
'''


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    return lines[0]


@pytest.fixture
def unchanged(flow_env, db_url, app_at_003):
    """The database as it was before the bad input; the test asserts it still is afterwards."""
    before = schema_dump(db_url), query(db_url, "SELECT name FROM migratehistory ORDER BY id")
    yield
    assert (schema_dump(db_url), query(db_url, "SELECT name FROM migratehistory ORDER BY id")) \
        == before


@pytest.mark.parametrize("setup, argv, expected", [
    pytest.param({}, ["--env", "staging"], "invalid choice: 'staging'", id="unknown-env"),
    pytest.param({"FLY_APP_NAME": "myapp"}, ["--env", "local"],
                 "--env local contradicts the environment, which says production", id="contradicting-env"),
    pytest.param({"DATABASE_URL": "postgres://app:Sup3rSecretPw@127.0.0.1:notaport/app"}, [],
                 "failed at configuration, nothing changed: the port in", id="malformed-url"),
    pytest.param({"DATABASE_URL": "mysql://app:Sup3rSecretPw@127.0.0.1/app"}, [],
                 "is not a postgres:// URL", id="not-postgres"),
    pytest.param({"MIGRATE_MIGRATIONS_DIR": "/nonexistent/migrations"}, [],
                 "/nonexistent/migrations", id="missing-folder"),
    pytest.param({"MIGRATE_LOCK_TIMEOUT": "2"}, [], "MIGRATE_LOCK_TIMEOUT", id="bare-number-timeout"),
])
def test_the_flow_refuses_bad_input_in_one_line(unchanged, monkeypatch, capsys, setup, argv,
                                                expected):
    for name, value in setup.items():
        monkeypatch.setenv(name, value)
    try:
        code = flow_script.main(argv)
    except SystemExit as exit_:  # argparse: usage, then the error
        code = exit_.code
        err = capsys.readouterr().err
        assert expected in err.strip().splitlines()[-1]
    else:
        line = _one_line(capsys.readouterr().out)
        assert line.startswith("migrate: ") and expected in line
        assert "nothing changed" in line or "rejected" in line
        assert "Sup3rSecretPw" not in line
    assert code in (1, 2)


def test_a_migration_that_raises_at_import_is_named_by_the_flow_and_the_cli(
        unchanged, migrations_dir, db_url, monkeypatch, capsys):
    (migrations_dir / "005_needs_old_settings.py").write_text(RAISES_AT_IMPORT)
    assert flow_script.main([]) == 1
    line = _one_line(capsys.readouterr().out)
    assert line.startswith("migrate: failed at plan, nothing changed:")
    assert "005_needs_old_settings.py" in line and "settings module not found" in line

    assert cli.main(["apply", "--database-url", db_url, "--migrations-dir", str(migrations_dir)]) == 1
    line = _one_line(capsys.readouterr().err)
    assert "005_needs_old_settings.py" in line and "settings module not found" in line


def test_the_cli_refuses_an_unknown_env_and_a_missing_backup_in_one_line(
        unchanged, db_url, flow_env, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--env", "staging", "status"])
    assert exit_.value.code == 2
    assert "invalid choice: 'staging'" in capsys.readouterr().err.strip().splitlines()[-1]

    code = cli.main(["restore", "backups/local/app/no-such.dump", "--into", "scratch_x",
                     "--database-url", db_url])
    assert code == 1
    line = _one_line(capsys.readouterr().err)
    assert "no backup backups/local/app/no-such.dump" in line and "dbmigrate backups" in line
    assert query(db_url, "SELECT count(*) FROM pg_database WHERE datname = 'scratch_x'") == [(0,)]
