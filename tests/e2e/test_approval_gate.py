"""The human gate on a real server: a retried run asks again, one deploy at a time, approve.py --list,
and the approver's notification with the run's address in the UI."""

from __future__ import annotations

import time

from helpers import query
from test_production_deployment import ALL, approve_cli, history, resume, start_run, wait_for

FAILS_ON_LIVE = '''"""005: refused by the live database only (the rehearsal's copy is named *_rehearsal_*)."""


def migrate(migrator, database, *, fake=False):
    migrator.sql("DO $$ BEGIN IF current_database() NOT LIKE '%%rehearsal%%' THEN "
                 "RAISE EXCEPTION 'refused on the live database'; END IF; END $$")


def rollback(migrator, database, *, fake=False):
    migrator.sql("SELECT 1")
'''
CHANGED = '''"""005: a comment on the project table."""


def migrate(migrator, database, *, fake=False):
    migrator.sql("COMMENT ON TABLE project IS 'retried'")


def rollback(migrator, database, *, fake=False):
    migrator.sql("COMMENT ON TABLE project IS NULL")
'''


def newest_plan(api, run_id: str) -> dict:
    """Return the run's newest `migration-plan` artifact (a retried run has one per attempt)."""
    found = api.post("/artifacts/filter", json={"sort": "CREATED_DESC", "artifacts": {
        "flow_run_id": {"any_": [run_id]}, "key": {"any_": ["migration-plan"]}}}).json()
    assert found, f"run {run_id} has no migration-plan artifact"
    return found[0]


def fingerprint(plan: dict) -> str:
    """Return the fingerprint on the first line of a plan artifact."""
    return plan["data"].splitlines()[0].rsplit("plan fingerprint `", 1)[1].rstrip("`")


def retry(api, run_id: str) -> None:
    """What the UI's Retry button does to a failed run: Scheduled, named AwaitingRetry."""
    answer = api.post(f"/flow_runs/{run_id}/set_state", json={
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    assert answer.status_code in (200, 201) and answer.json()["status"] == "ACCEPT", answer.text


def test_a_retried_approved_run_pauses_again_and_applies_only_what_is_approved_again(
        served, prefect_server, production_env, db_url, migrations_dir, receiver):
    (migrations_dir / "005_project_comment.py").write_text(FAILS_ON_LIVE)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served.output())
        first = fingerprint(newest_plan(api, run_id))
        told = receiver.wait_for("waits for approval")
        assert f"{prefect_server.api_url.removesuffix('/api')}/runs/flow-run/{run_id}" in told
        assert f"python flows/approve.py {run_id} --approve" in told
        assert resume(api, run_id, {"approve": True, "approver": "Ada"})["status"] == "ACCEPT"
        state = wait_for(api, run_id, {"FAILED"}, served.output())
        assert state["message"].startswith("failed at apply, nothing changed: apply of "
                                           "005_project_comment failed")
        assert "failed at apply" in receiver.wait_for("failed:")
        assert history(db_url) == []

        (migrations_dir / "005_project_comment.py").write_text(CHANGED)  # edited, then Retry
        retry(api, run_id)
        wait_for(api, run_id, {"PAUSED"}, served.output())  # asks again: nothing reused
        assert history(db_url) == []
        second = fingerprint(newest_plan(api, run_id))
        assert second != first

        stale = approve_cli(production_env, run_id, "--approve", "--approver", "Ada",
                            "--fingerprint", first)
        assert stale.returncode == 1 and "the plan changed" in stale.stdout, stale.stdout
        assert api.get(f"/flow_runs/{run_id}").json()["state"]["type"] == "PAUSED"
        fresh = approve_cli(production_env, run_id, "--approve", "--approver", "Ada",
                            "--comment", "new plan read", "--fingerprint", second)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        state = wait_for(api, run_id, {"COMPLETED"}, served.output())
    assert state["message"] == f"applied 5: {', '.join(ALL)}, 005_project_comment"
    assert query(db_url, "SELECT DISTINCT approver, comment, fingerprint, run_id FROM migration_audit"
                 ) == [("Ada", "new plan read", second, run_id)]
    assert query(db_url, "SELECT obj_description('project'::regclass)") == [("retried",)]


def test_two_runs_triggered_together_never_both_pause(served, prefect_server, production_env,
                                                      db_url):
    runs = [start_run(production_env), start_run(production_env)]
    with prefect_server.api() as api:
        def types() -> dict[str, str]:
            return {r: api.get(f"/flow_runs/{r}").json()["state"]["type"] for r in runs}

        deadline = time.monotonic() + 120
        while "PAUSED" not in types().values():
            assert time.monotonic() < deadline, types()
            time.sleep(0.5)
        first = next(r for r, t in types().items() if t == "PAUSED")
        other = next(r for r in runs if r != first)
        # the other one starts once the first pauses (Prefect frees the deployment slot then),
        # and waits for the deploy slot the first holds through its pause
        served.wait_for_output("is running or waiting for approval: this run waits for it",
                               timeout=120)
        assert types() == {first: "PAUSED", other: "RUNNING"}

        listed = approve_cli(production_env, "--list")
        assert listed.returncode == 0, listed.stdout + listed.stderr
        lines = listed.stdout.splitlines()
        assert len(lines) == 2 and lines[0].startswith(f"{first}  migrate-production  target ")
        assert "(production)  paused since " in lines[0] and " plan " in lines[0]
        assert lines[1].strip().startswith("4 migration(s) to apply to postgres://")

        assert resume(api, first, {"approve": False, "approver": "Bob"})["status"] == "ACCEPT"
        wait_for(api, first, {"FAILED"}, served.output())
        wait_for(api, other, {"PAUSED"}, served.output())
        assert types()[first] == "FAILED"
        assert resume(api, other, {"approve": False, "approver": "Bob"})["status"] == "ACCEPT"
        wait_for(api, other, {"FAILED"}, served.output())
    assert history(db_url) == []
    none = approve_cli(production_env, "--list")
    assert none.stdout.startswith("no run is waiting for an approval on ")
