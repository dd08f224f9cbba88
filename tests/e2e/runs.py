"""What the end-to-end tests do with a run of `migrate/migrate-production`: start it as the pipeline
does, wait for its state, read its plan, answer it as the UI or approve.py does, retry it as the
UI's Retry button does; and migrations a test may put in place."""

from __future__ import annotations

import re
import subprocess
import sys

from helpers import REPO, query, wait_until
from prefect_api import PrefectApi
from processes import Service

ALL = ["001_initial_schema", "002_add_document_metadata", "003_add_project_slug",
       "004_fix_sourcedir_language"]
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
RUN_TIMEOUT = 120.0


def start_run(env: dict[str, str]) -> str:
    """Run `prefect deployment run migrate/migrate-production`; return the new flow run's id."""
    out = subprocess.run([sys.executable, "-m", "prefect", "deployment", "run",
                          "migrate/migrate-production"], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    found = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout)
    assert out.returncode == 0 and found, out.stdout + out.stderr
    return found.group(1)


def run_state(api: PrefectApi, run_id: str) -> dict:
    """Return the run's current state (type, name, message, ...)."""
    return api.get(f"/flow_runs/{run_id}")["state"] or {}


def wait_for(api: PrefectApi, run_id: str, types: set[str], process: Service,
             timeout: float = RUN_TIMEOUT) -> dict:
    """Return the run's state once its type is one of ``types``; fail with the state and the log
    of the ``process`` running it once it ends in another state or ``timeout`` passes."""
    state: dict = {}

    def reached() -> bool:
        state.clear()
        state.update(run_state(api, run_id))
        return state.get("type") in types

    wait_until(reached, lambda: (f"run {run_id} to be {sorted(types)}: it is {state.get('type')} "
                                 f"({state.get('message')})"),
               timeout=timeout, gave_up=lambda: state.get("type") in FINAL, log=process.output,
               interval=0.5)
    return state


def plan_artifact(api: PrefectApi, run_id: str) -> dict:
    """Return the run's `migration-plan` artifact (markdown in "data", headline in "description")."""
    found = api.post("/artifacts/filter", {"artifacts": {
        "flow_run_id": {"any_": [run_id]}, "key": {"any_": ["migration-plan"]}}})
    assert len(found) == 1, found
    return found[0]


def resume(api: PrefectApi, run_id: str, run_input: dict | None) -> dict:
    """POST /flow_runs/{id}/resume (as the UI does); return the JSON answer."""
    body = {} if run_input is None else {"run_input": run_input}
    return api.post(f"/flow_runs/{run_id}/resume", body)


def approve_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    """Run `python flows/approve.py ARGS` as the approver would from a terminal."""
    return subprocess.run([sys.executable, str(REPO / "flows" / "approve.py"), *args], env=env,
                          cwd=REPO, capture_output=True, text=True, timeout=60)


def history(url: str) -> list[str]:
    """Return the names of the applied migrations (none if the history table does not exist)."""
    if query(url, "SELECT to_regclass('migratehistory')") == [(None,)]:
        return []
    return [row[0] for row in query(url, "SELECT name FROM migratehistory ORDER BY id")]


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


def newest_plan(api: PrefectApi, run_id: str) -> dict:
    """Return the run's newest `migration-plan` artifact (a retried run has one per attempt)."""
    found = api.post("/artifacts/filter", {"sort": "CREATED_DESC", "artifacts": {
        "flow_run_id": {"any_": [run_id]}, "key": {"any_": ["migration-plan"]}}})
    assert found, f"run {run_id} has no migration-plan artifact"
    return found[0]


def fingerprint(plan: dict) -> str:
    """Return the fingerprint on the first line of a plan artifact."""
    return plan["data"].splitlines()[0].rsplit("plan fingerprint `", 1)[1].rstrip("`")


def retry(api: PrefectApi, run_id: str) -> None:
    """What the UI's Retry button does to a failed run: Scheduled, named AwaitingRetry."""
    answer = api.post(f"/flow_runs/{run_id}/set_state", {
        "state": {"type": "SCHEDULED", "name": "AwaitingRetry"}, "force": True})
    assert answer["status"] == "ACCEPT", answer
