"""Nothing reaches a database unapproved, whoever starts the run and with whatever parameters: a
made-up fleet approval, one naming a real fleet run that never started this run or nobody
approved, and an approval written straight into a paused run's input with lax types."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timezone

import pytest
from helpers import query, schema_dump, wait_until
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.states import Cancelled, Running

from dbcore.connection import Env, Target
from dbcore.deploy.fleet import FleetApproval, database_fingerprint, parts_fingerprint
from dbcore.migrate.plan import plan_apply
from flows.fleet_check import PARTS_KEY
from flows.migrate import migrate


def _applied(url: str) -> list[str]:
    return [r[0] for r in query(url, "SELECT name FROM migratehistory ORDER BY id")]


def _honest_looking(db_url: str, settings, database: str = "anything", **extra) -> FleetApproval:
    """What anyone who can start the deployment can compute: this database's true plan fingerprint."""
    plan = plan_apply(Target(Env.LOCAL, db_url), settings)
    return FleetApproval(fleet_fingerprint="forged", database=database, approver="Mallory",
                         plan_fingerprint=database_fingerprint(
                             database, [(m.name, m.sha256) for m in plan.migrations]), **extra)


@pytest.fixture
def production(flow_env, app_at_003, db_url, other_pg_server_url, monkeypatch):
    """A production-like target: FLY_APP_NAME set, the rehearsal on another server; 004 pending."""
    monkeypatch.setenv("FLY_APP_NAME", "myapp")
    monkeypatch.setenv("MIGRATE_REHEARSAL_DATABASE_URL", other_pg_server_url)
    return app_at_003


def test_a_made_up_fleet_approval_is_refused_and_production_is_untouched(production, db_url):
    before = schema_dump(db_url)
    forged = _honest_looking(db_url, production)
    state = migrate(env="production", fleet_approval=forged, return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed at configuration, nothing changed: fleet_approval "
                                    "refused: it names no migrate-fleet run"), state.message
    assert schema_dump(db_url) == before and "004_fix_sourcedir_language" not in _applied(db_url)
    assert ("Mallory",) not in query(db_url, "SELECT actor FROM migration_audit")


def test_naming_a_real_unapproved_fleet_run_is_refused(production, db_url):
    """The fleet run exists, runs, and even stores a plan holding this database: but it did not
    start this run and nobody approved it."""
    forged = _honest_looking(db_url, production)
    parts = [[forged.database, "", forged.plan_fingerprint]]
    @flow(name="migrate-fleet")
    def look_alike() -> None:
        pass

    with get_client(sync_client=True) as client:
        fleet_run = client.create_flow_run(look_alike, state=Running())
        fingerprint = parts_fingerprint(parts)
        client.create_flow_run_input(fleet_run.id, PARTS_KEY.format(fingerprint=fingerprint),
                                     json.dumps(parts))
    forged = forged.model_copy(update={"fleet_fingerprint": fingerprint,
                                       "fleet_run_id": str(fleet_run.id)})
    before = schema_dump(db_url)
    try:
        state = migrate(env="production", fleet_approval=forged, return_state=True)
    finally:  # the look-alike ends: no later test of this session finds it running
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(fleet_run.id, Cancelled(), force=True)
    assert state.is_failed()
    assert "fleet_approval refused: this run was not started by the migrate-fleet run" in state.message
    assert schema_dump(db_url) == before


def _paused_since(at: datetime) -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
            start_time=FlowRunFilterStartTime(after_=at)))


def test_an_answer_written_around_the_form_with_a_string_for_true_is_a_rejection(flow_env, db_url):
    """`POST /flow_runs/{id}/input` under the pause's key with {"approve": "true"}, then the state
    forced to Running: the run reads a malformed answer, and rejects."""
    result: dict = {}
    at = datetime.now(timezone.utc)
    thread = threading.Thread(target=lambda: result.update(state=migrate(
        require_approval=True, backup=False, return_state=True)))
    thread.start()
    paused: list = []
    wait_until(lambda: paused.extend(_paused_since(at)) or paused, "the run to pause", timeout=120,
               gave_up=lambda: not thread.is_alive(), log=lambda: str(result), interval=0.5)
    run = paused[0]
    key = run.state.state_details.run_input_keyset["response"]
    with get_client(sync_client=True) as client:
        client.create_flow_run_input(run.id, key, '{"approve": "true", "approver": "x"}')
        client.set_flow_run_state(run.id, Running(), force=True)
    thread.join(120)
    state = result["state"]
    assert state.is_failed()
    assert state.message.startswith("rejected (a malformed answer was stored (approve: "), state.message
    assert state.message.endswith("nothing changed")
    assert query(db_url, "SELECT to_regclass('migratehistory')") == [(None,)]  # nothing applied
