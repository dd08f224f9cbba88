"""The human gate as an approver meets it: one approval for one plan, recorded; the notifications."""

from __future__ import annotations

import json

import pytest
from flowruns import applied, final_state, run_in_background, wait_for_pause
from helpers import query, schema_dump
from prefect.client.orchestration import get_client
from prefect.flow_runs import resume_flow_run

from dbcore.ports import free_port
from flows.migrate import migrate


def form_description(paused) -> str:
    """Return the markdown shown above the approval form of a paused run."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(paused.id)
        key = run.state.state_details.run_input_keyset["description"]
        return json.loads(client.read_flow_run_input(paused.id, key))


def test_an_approval_covers_one_plan_and_is_recorded(flow_env, db_url, receiver):
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    form = form_description(paused)
    first = form.splitlines()[0]
    assert first.startswith("**Apply 4 migration(s) to `t_") and "rehearsed on a copy: passed" in first
    fingerprint = first.rsplit("plan fingerprint `", 1)[1].rstrip("`")
    assert len(fingerprint) == 16
    told = receiver.wait_for("waits for approval")
    assert "4 migration(s) to apply to" in told and f"(plan {fingerprint})" in told
    assert (f"python flows/approve.py {paused.id} --approve --approver YOUR_NAME "
            f"--fingerprint {fingerprint}") in told

    with pytest.raises(RuntimeError, match="Cannot resume this run"):  # an answer for another plan
        resume_flow_run(paused.id, run_input={"approve": True, "approver": "Eve",
                                              "fingerprint": "0123456789abcdef"})
    assert applied(db_url) == []
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada", "comment": "reviewed"})
    assert final_state(thread, result).message.startswith("applied 4")
    rows = query(db_url, "SELECT DISTINCT actor, approver, comment, fingerprint, run_id FROM migration_audit")
    assert rows == [("Ada", "Ada", "reviewed", fingerprint, str(paused.id))]
    assert "completed: applied 4" in receiver.wait_for("completed")


def test_a_plan_changed_after_the_approval_is_not_applied(flow_env, db_url, migrations_dir, receiver):
    before = schema_dump(db_url)
    thread, result = run_in_background(require_approval=True)
    paused = wait_for_pause(thread, result)
    path = migrations_dir / "004_fix_sourcedir_language.py"
    path.write_text(path.read_text() + "\n# edited after the approval was asked for\n")
    resume_flow_run(paused.id, run_input={"approve": True, "approver": "Ada"})
    state = final_state(thread, result)
    assert state.is_failed()
    assert state.message == ("plan changed since it was approved, nothing changed: "
                             "004_fix_sourcedir_language.py changed on disk; run again and approve "
                             "the new plan")
    assert applied(db_url) == [] and schema_dump(db_url) == before
    assert "failed: plan changed since it was approved" in receiver.wait_for("failed")


def test_a_failed_run_is_told_with_its_reason_and_no_secret(flow_env, db_url, receiver, monkeypatch,
                                                            migrations_dir):
    from fixtures_s3 import S3_SECRET_KEY

    monkeypatch.setenv("DATABASE_URL", db_url.replace("postgres@", "postgres:Sup3rSecretPw@"))
    (migrations_dir / "005_raw.py").write_text(
        "def migrate(migrator, database, *, fake=False):\n"
        "    database.execute_sql('ALTER TABLE project ADD COLUMN x int')\n\n"
        "def rollback(migrator, database, *, fake=False):\n"
        "    migrator.sql('ALTER TABLE project DROP COLUMN x')\n")
    state = migrate(return_state=True)
    assert state.is_failed()
    told = receiver.wait_for("failed")
    assert told.splitlines()[0] == f"migrate run {_run_name(state)} failed: {state.message.splitlines()[0]}"
    assert "failed at lint, nothing changed" in told
    assert all("Sup3rSecretPw" not in t and S3_SECRET_KEY not in t for t in receiver.texts)


def _run_name(state) -> str:
    with get_client(sync_client=True) as client:
        return client.read_flow_run(state.state_details.flow_run_id).name


@pytest.mark.parametrize("where", ["closed port", "server error", "slow receiver"])
def test_an_undeliverable_notification_never_fails_or_blocks_the_run(flow_env, db_url, monkeypatch,
                                                                     where):
    from receiver import Receiver

    server = None
    if where == "closed port":
        monkeypatch.setenv("MIGRATE_NOTIFY_URL", f"http://127.0.0.1:{free_port()}/hook")
    else:
        server = Receiver(status=500) if where == "server error" else Receiver(delay=30)
        monkeypatch.setenv("MIGRATE_NOTIFY_URL", server.url)
        monkeypatch.setenv("MIGRATE_NOTIFY_TIMEOUT", "1")
    try:
        state = migrate(dry_run=True, return_state=True)
    finally:
        if server:
            server.close()
    assert state.is_completed() and state.message.startswith("dry run: would apply 4")
