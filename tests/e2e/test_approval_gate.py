"""The human gate on a real server: a retried run asks again, one deploy at a time, approve.py --list,
and the approver's notification with the run's address in the UI."""

from __future__ import annotations

from helpers import query, wait_until
from runs import (
    ALL,
    CHANGED,
    FAILS_ON_LIVE,
    RUN_TIMEOUT,
    approve_cli,
    fingerprint,
    history,
    newest_plan,
    resume,
    retry,
    run_state,
    start_run,
    wait_for,
)


def test_a_retried_approved_run_pauses_again_and_applies_only_what_is_approved_again(
        served, prefect_server, production_env, db_url, migrations_dir, receiver):
    (migrations_dir / "005_project_comment.py").write_text(FAILS_ON_LIVE)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        first = fingerprint(newest_plan(api, run_id))
        told = receiver.wait_for("waits for approval")
        assert f"{prefect_server.api_url.removesuffix('/api')}/runs/flow-run/{run_id}" in told
        assert f"python flows/approve.py {run_id} --approve" in told
        assert resume(api, run_id, {"approve": True, "approver": "Ada"})["status"] == "ACCEPT"
        state = wait_for(api, run_id, {"FAILED"}, served)
        assert state["message"].startswith("failed at apply, nothing changed: apply of "
                                           "005_project_comment failed")
        assert "failed at apply" in receiver.wait_for("failed:")
        assert history(db_url) == []

        (migrations_dir / "005_project_comment.py").write_text(CHANGED)  # edited, then Retry
        retry(api, run_id)
        wait_for(api, run_id, {"PAUSED"}, served)  # asks again: nothing reused
        assert history(db_url) == []
        second = fingerprint(newest_plan(api, run_id))
        assert second != first

        stale = approve_cli(production_env, run_id, "--approve", "--approver", "Ada",
                            "--fingerprint", first)
        assert stale.returncode == 1 and "the plan changed" in stale.stdout, stale.stdout
        assert run_state(api, run_id)["type"] == "PAUSED"
        fresh = approve_cli(production_env, run_id, "--approve", "--approver", "Ada",
                            "--comment", "new plan read", "--fingerprint", second)
        assert fresh.returncode == 0, fresh.stdout + fresh.stderr
        state = wait_for(api, run_id, {"COMPLETED"}, served)
    assert state["message"] == f"applied 5: {', '.join(ALL)}, 005_project_comment"
    assert query(db_url, "SELECT DISTINCT approver, comment, fingerprint, run_id FROM migration_audit"
                 ) == [("Ada", "new plan read", second, run_id)]
    assert query(db_url, "SELECT obj_description('project'::regclass)") == [("retried",)]


def test_two_runs_triggered_together_never_both_pause(served, prefect_server, production_env,
                                                      db_url):
    runs = [start_run(production_env), start_run(production_env)]
    with prefect_server.api() as api:
        def types() -> dict[str, str]:
            return {r: run_state(api, r).get("type") for r in runs}

        wait_until(lambda: "PAUSED" in types().values(), "one of the two runs to pause",
                   timeout=RUN_TIMEOUT, log=served.output, interval=0.5)
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
        wait_for(api, first, {"FAILED"}, served)
        wait_for(api, other, {"PAUSED"}, served)
        assert types()[first] == "FAILED"
        assert resume(api, other, {"approve": False, "approver": "Bob"})["status"] == "ACCEPT"
        wait_for(api, other, {"FAILED"}, served)
    assert history(db_url) == []
    none = approve_cli(production_env, "--list")
    assert none.stdout.startswith("no run is waiting for an approval on ")
