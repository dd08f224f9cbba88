"""`migrate/migrate-production` as the deploy pipeline and the approver use it: a real Prefect
server, the real `prefect` CLI, a served (or worker-run) deployment, the REST API and approve.py.
"""

from __future__ import annotations

import os
import signal

import pytest
from helpers import apply_pending, query, schema_dump, wait_until
from processes import alive, descendants
from runs import ALL, FINAL, approve_cli, history, plan_artifact, resume, run_state, start_run, wait_for

from dbcore.connection import Env, Target


@pytest.mark.parametrize("runner", ["served", "worker"])
def test_approved_from_a_terminal_the_run_applies_and_records_the_approver(
        runner, request, prefect_server, production_env, db_url):
    process = request.getfixturevalue(runner)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, process)
        assert history(db_url) == []  # nothing before the approval
        plan = plan_artifact(api, run_id)
        assert all(name in plan["data"] for name in ALL) and "Rehearsal on a copy passed" in plan["data"]

        answered = approve_cli(production_env, run_id, "--approve", "--approver", "Ada",
                               "--comment", "looks good")
        assert answered.returncode == 0, answered.stdout + answered.stderr
        assert answered.stdout.splitlines() == [f"plan: {plan['description']}",
                                                f"approved run {run_id} as Ada: the run resumes"]
        state = wait_for(api, run_id, {"COMPLETED"}, process)
    assert state["message"] == f"applied 4: {', '.join(ALL)}"
    assert history(db_url) == ALL
    assert query(db_url, "SELECT DISTINCT actor FROM migration_audit") == [("Ada",)]

    again = approve_cli(production_env, run_id, "--approve", "--approver", "Ada")
    assert again.returncode == 1
    assert again.stdout.splitlines()[-1] == (f"not approved: the server refused the answer for run "
                                             f"{run_id}: Cannot resume a flow run that is not paused.")


def test_rejected_in_the_ui_the_run_fails_and_changes_nothing(served, prefect_server,
                                                              production_env, db_url, s3_settings,
                                                              migrations_dir):
    apply_pending(Target(Env.LOCAL, db_url), s3_settings.model_copy(
        update={"migrations_dir": migrations_dir}), upto="003")
    before = schema_dump(db_url)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        assert "004_fix_sourcedir_language" in plan_artifact(api, run_id)["data"]
        answer = resume(api, run_id, {"approve": False, "approver": "Bob",
                                      "comment": "not on a Friday"})
        assert answer["status"] == "ACCEPT", answer
        state = wait_for(api, run_id, {"FAILED"}, served)
    assert state["message"] == "rejected by Bob: not on a Friday, nothing changed"
    assert schema_dump(db_url) == before
    assert history(db_url) == ALL[:3]


def test_a_malformed_or_empty_answer_never_applies(served, prefect_server, production_env, db_url):
    before = schema_dump(db_url)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        wrong = resume(api, run_id, {"approve": "yes please", "approver": "Eve"})
        assert wrong["status"] == "REJECT" and "approve" in wrong["details"]["reason"]
        assert run_state(api, run_id)["type"] == "PAUSED"
        empty = resume(api, run_id, None)  # the form sent as it opens: approve is unticked
        assert empty["status"] == "ACCEPT", empty
        state = wait_for(api, run_id, {"FAILED"}, served)
    assert state["message"] == "rejected, nothing changed"
    assert schema_dump(db_url) == before and history(db_url) == []


def test_a_restart_while_paused_cancels_the_run_and_changes_nothing(served, prefect_server,
                                                                    production_env, db_url):
    before = schema_dump(db_url)
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        run_processes = descendants(served.pid)
        assert run_processes  # the paused run's process, waiting for the answer
        os.kill(served.pid, signal.SIGTERM)  # what a machine restart (fly deploy) sends
        served.wait_for_exit(timeout=30)
        state = wait_for(api, run_id, {"CANCELLED"}, served, timeout=30)
    # the run's process is told to stop too: it must not linger, waiting for an answer
    wait_until(lambda: not any(alive(pid) for pid in run_processes),
               f"the paused run's processes {run_processes} to end", timeout=30, log=served.output)
    refused = approve_cli(production_env, run_id, "--approve", "--approver", "Ada")
    assert refused.returncode == 1 and "not paused" in refused.stdout, state
    assert schema_dump(db_url) == before and history(db_url) == []


def test_an_approval_without_a_name_is_refused_and_the_run_keeps_waiting(
        served, prefect_server, production_env, db_url):
    run_id = start_run(production_env)
    with prefect_server.api() as api:
        wait_for(api, run_id, {"PAUSED"}, served)
        answer = resume(api, run_id, {"approve": True, "comment": "ship it"})
        if answer["status"] == "ACCEPT":  # not refused: at least nothing may change
            wait_for(api, run_id, FINAL, served)
            assert history(db_url) == []
        assert answer["status"] == "REJECT" and "approver" in answer["details"]["reason"]
        assert run_state(api, run_id)["type"] == "PAUSED"


def test_approve_cli_refuses_a_nameless_approval_an_unknown_run_and_a_missing_api(prefect_server):
    env = {**os.environ, **prefect_server.env}
    unknown = "00000000-0000-4000-8000-000000000000"
    nameless = approve_cli(env, unknown, "--approve", "--approver", " ")
    assert nameless.returncode == 2 and "an approval needs the approver's name" in nameless.stderr
    missing = approve_cli(env, unknown, "--reject", "--approver", "Bob")
    assert missing.returncode == 1
    assert missing.stdout.strip() == f"no flow run {unknown} on {prefect_server.api_url}/"
    no_api = approve_cli({**env, "PREFECT_API_URL": ""}, unknown, "--reject",
                         "--approver", "Bob")
    assert no_api.returncode == 2 and "set PREFECT_API_URL" in no_api.stderr
