"""No secret in any output, however it is written or wherever it comes from: a password with an
unescaped "#", "?" or "/" in DATABASE_URL, and a migration whose error message carries
DATABASE_URL, AWS_SECRET_ACCESS_KEY, the webhook's URL or a *TOKEN* variable. Checked where a user
would find them: dbmigrate's output and error line, Prefect's stored runs, task runs, states,
artifacts and its `log` table (the "Task run failed with exception" rows included), and the
notifications."""

from __future__ import annotations

import uuid

import pytest
from fixtures_s3 import S3_SECRET_KEY
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from test_rehearsal_and_secrets import _everything_prefect_stored

from dbcore.cli.main import main as dbmigrate
from flows.migrate import migrate

#: a migration that fails quoting every secret it can reach (as careless error handling does)
LEAKY = (
    "import os\n\n"
    "def migrate(migrator, database, *, fake=False):\n"
    "    raise RuntimeError('cannot reach ' + os.environ['DATABASE_URL'] + ' with '\n"
    "                       + os.environ['AWS_SECRET_ACCESS_KEY'] + ' token '\n"
    "                       + os.environ['DEPLOY_BOT_TOKEN'] + ' hook '\n"
    "                       + os.environ.get('MIGRATE_NOTIFY_URL', ''))\n\n"
    "def rollback(migrator, database, *, fake=False):\n    pass\n"
)


def _with_password(db_url: str, password: str) -> str:
    """The test database's URL with ``password`` written in it as is (not percent-encoded)."""
    return db_url.replace("postgres@", f"postgres:{password}@")


@pytest.mark.parametrize("special", ["#", "?", "/", "#?/@"])
def test_status_reads_a_password_with_special_characters_and_never_shows_it(
        db_url, special, monkeypatch, capfd):
    password = f"Pw{special}{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("DATABASE_URL", _with_password(db_url, password))
    assert dbmigrate(["status"]) == 0
    out, err = capfd.readouterr()
    assert "postgres:***@127.0.0.1" in out  # the server it reached, the password masked
    assert password not in out + err
    assert password.split(special)[-1] not in out + err  # nor its part after the special character


def test_a_password_in_the_query_is_masked_too(db_url, monkeypatch, capfd):
    password = "Qp-" + uuid.uuid4().hex[:10]
    monkeypatch.setenv("DATABASE_URL", f"{db_url}?password={password}&sslmode=disable")
    assert dbmigrate(["status"]) == 0
    out, err = capfd.readouterr()
    assert password not in out + err and "password=***" in out


def test_a_url_whose_password_cannot_be_told_from_its_host_is_refused_in_one_line(monkeypatch, capfd):
    monkeypatch.setenv("DATABASE_URL", "postgres://app:pa55word@ho[st/db")
    assert dbmigrate(["status"]) == 2
    err = capfd.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "percent-encode" in err and "pa55word" not in err


def test_dbmigrate_error_line_holds_no_secret_a_migration_quoted(
        db_url, migrations_dir, s3_settings, monkeypatch, capfd):
    password, token = "Pw#/" + uuid.uuid4().hex[:8], "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("DATABASE_URL", _with_password(db_url, password))
    monkeypatch.setenv("DEPLOY_BOT_TOKEN", token)
    monkeypatch.setenv("MIGRATE_MIGRATIONS_DIR", str(migrations_dir))
    (migrations_dir / "005_leaky.py").write_text(LEAKY)
    assert dbmigrate(["apply"]) == 1
    err = capfd.readouterr().err
    line = [x for x in err.splitlines() if x.startswith("dbmigrate: error:")]
    assert line and "005_leaky" in line[0] and "***" in line[0]
    for secret in (password, S3_SECRET_KEY, token):
        assert secret not in err


@pytest.mark.parametrize("backup", [True, False], ids=["rehearsal", "apply-task"])
def test_secrets_in_a_migration_error_reach_no_log_row_state_artifact_or_notification(
        flow_env, db_url, migrations_dir, receiver, monkeypatch, capfd, caplog, backup):
    password, token = "Pw#?/" + uuid.uuid4().hex[:8], "tok-" + uuid.uuid4().hex
    monkeypatch.setenv("DATABASE_URL", _with_password(db_url, password))
    monkeypatch.setenv("DEPLOY_BOT_TOKEN", token)
    (migrations_dir / "005_leaky.py").write_text(LEAKY)
    # with a backup the error is the rehearsal's (the plan artifact); without, the apply task's
    # own exception ("Task run failed with exception ..." in Prefect's log table)
    state = migrate(backup=backup, return_state=True)
    assert state.is_failed(), state.message
    stored = _everything_prefect_stored(state.state_details.flow_run_id)
    captured = capfd.readouterr()
    seen = "\n".join([stored, captured.out, captured.err, caplog.text, state.message or "",
                      *receiver.texts])
    assert "cannot reach" in seen and "***" in seen  # the error really was shown, scrubbed
    if not backup:
        assert "Task run encountered an exception MigrationFailed" in stored
    assert receiver.texts and "failed" in receiver.texts[-1]
    for secret in (password, S3_SECRET_KEY, token, "secret-token"):
        assert secret not in seen, secret


def test_prefects_own_task_failure_rows_are_scrubbed(flow_env, db_url, monkeypatch, capfd):
    """A task that raises with a secret (ours, or any Prefect task in the same process): the
    "Task run failed with exception" row Prefect writes to its log table holds no secret."""
    from prefect import flow
    from prefect import task as plain_task

    from flows.scrub import task

    password = "Pw#?/" + uuid.uuid4().hex[:8]
    monkeypatch.setenv("DATABASE_URL", _with_password(db_url, password))

    def fail() -> None:
        import os

        raise RuntimeError(f"boom {os.environ['DATABASE_URL']} {os.environ['AWS_SECRET_ACCESS_KEY']}")

    @flow(name="leaky")
    def leaky() -> None:
        for kind in (task(name="ours")(fail), plain_task(name="plain")(fail)):
            try:
                kind()
            except Exception:
                pass

    state = leaky(return_state=True)
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        rows = [r.message for r in client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
            any_=[state.state_details.flow_run_id])))]
        ours = [t for t in client.read_task_runs(flow_run_filter=FlowRunFilter(
            id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))) if t.name.startswith("ours")]
    failed_rows = [r for r in rows if "Task run failed with exception" in r]
    assert len(failed_rows) == 2 and all("boom" in r and "***" in r for r in failed_rows)
    # Prefect's log table: clean for any task; our task's stored state: clean too
    seen = "\n".join(rows + [t.model_dump_json() for t in ours] + [capfd.readouterr().err])
    assert password not in seen and S3_SECRET_KEY not in seen
