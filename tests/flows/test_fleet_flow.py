"""The `migrate-fleet` flow on six databases of the private cluster: canary first, waves, a failure."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import query, schema_dump, wait_until
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
from prefect.client.schemas.objects import StateType
from prefect.flow_runs import resume_flow_run
from test_migrate_flow import applied, artifacts

from dbcore.deploy.fleet import FleetApproval
from flows.fleet import migrate_fleet
from flows.migrate import migrate

ALL = ["001_initial_schema", "002_add_document_metadata", "003_add_project_slug",
       "004_fix_sourcedir_language"]


@pytest.fixture
def fleet(flow_env, make_database, monkeypatch, tmp_path):
    """Six fresh databases named in a targets file (canary 1, concurrency 2); return (file, urls)."""
    urls = []
    lines = ["canary: 1", "concurrency: 2", "databases:"]
    for i in range(1, 7):
        url = make_database(f"fleet{i}")
        monkeypatch.setenv(f"FLEET_DB_{i}_URL", url)
        urls.append(url)
        lines.append(f"  - {{name: tenant-{i}, url_env: FLEET_DB_{i}_URL}}")
    targets = tmp_path / "fleet.yaml"
    targets.write_text("\n".join(lines) + "\n")
    return targets, urls


def test_a_failure_on_the_third_stops_later_waves_and_leaves_it_as_before(fleet):
    targets, urls = fleet
    # someone made a table of that name by hand on the third: 001 cannot create it there
    query(urls[2], "CREATE TABLE project (id integer PRIMARY KEY, note text)")
    before = {i: schema_dump(url) for i, url in enumerate(urls)}

    state = migrate_fleet(env="local", targets=str(targets), backup=False, return_state=True)

    assert state.is_failed()
    assert state.message.startswith("2 applied, 0 up to date, 1 failed, 3 not started; tenant-3: "
                                    "failed at apply"), state.message
    assert applied(urls[0]) == ALL and applied(urls[1]) == ALL  # the canary, then its wave-mate
    assert applied(urls[2]) == [] and schema_dump(urls[2]) == before[2]  # exactly as before
    for i in (3, 4, 5):  # never started: untouched
        assert schema_dump(urls[i]) == before[i] and applied(urls[i]) == []
    result = artifacts(state.state_details.flow_run_id)
    assert "Fleet plan fingerprint" in result["fleet-plan"]
    assert all(f"tenant-{i}" in result["fleet-plan"] for i in range(1, 7))
    table = result["fleet-result"]
    assert '"state": "not started"' in table and table.count('"applied"') == 2
    assert "postgres://" not in table and "postgres://" not in result["fleet-plan"]


def test_the_fleet_applies_everywhere_then_is_up_to_date(fleet):
    targets, urls = fleet
    state = migrate_fleet(env="local", targets=str(targets), backup=False, return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "6 applied, 0 up to date, 0 failed, 0 not started"
    assert all(applied(url) == ALL for url in urls)

    again = migrate_fleet(env="local", targets=str(targets), backup=False, return_state=True)
    assert again.is_completed() and again.message == "all 6 databases up to date"


def test_a_missing_variable_fails_before_anything_changes(fleet, monkeypatch):
    targets, urls = fleet
    monkeypatch.delenv("FLEET_DB_4_URL")
    state = migrate_fleet(env="local", targets=str(targets), backup=False, return_state=True)
    assert state.is_failed()
    assert state.message == ("failed at configuration, nothing changed: FLEET_DB_4_URL is not set: set "
                             "it to the database's URL (postgres://USER:PASSWORD@HOST:PORT/DBNAME) "
                             "where this runs")
    assert all(applied(url) == [] for url in urls)


def _paused_runs() -> list:
    with get_client(sync_client=True) as client:
        return client.read_flow_runs(flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))


def test_one_approval_covers_the_fleet_and_no_database_asks_again(fleet):
    targets, urls = fleet
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(state=migrate_fleet(
        env="local", targets=str(targets), require_approval=True, return_state=True)))
    thread.start()
    paused: list = []
    wait_until(lambda: paused.extend(_paused_runs()) or paused, "the fleet to pause for its approval",
               timeout=120, gave_up=lambda: not thread.is_alive(), log=lambda: str(result), interval=0.5)
    assert len(paused) == 1 and paused[0].name.startswith("migrate-fleet")
    plan = artifacts(paused[0].id)["fleet-plan"]
    assert "| tenant-1 (canary) |" in plan and "passed: dry run: would apply 4" in plan
    assert all(applied(url) == [] for url in urls)  # the canary was rehearsed on a copy only

    resume_flow_run(paused[0].id, run_input={"approve": True, "approver": "Ada", "comment": "go"})
    thread.join(240)
    assert "state" in result, "the fleet run did not end within 240s"
    state = result["state"]
    assert state.is_completed(), state.message
    assert state.message == "6 applied, 0 up to date, 0 failed, 0 not started"
    assert _paused_runs() == []  # no database's run paused to ask again
    for url in urls:
        assert applied(url) == ALL
        assert query(url, "SELECT DISTINCT actor FROM migration_audit") == [("Ada",)]
    rows = json.loads(artifacts(state.state_details.flow_run_id)["fleet-result"])
    assert [r["database"] for r in rows] == [f"tenant-{i}" for i in range(1, 7)]
    assert all(r["backup key"].endswith(".dump") and r["state"] == "applied" for r in rows)


def test_a_run_handed_another_plan_s_approval_refuses_and_changes_nothing(flow_env, db_url, monkeypatch):
    monkeypatch.setenv("TENANT_URL", db_url)
    before = schema_dump(db_url)
    approval = FleetApproval(fleet_fingerprint="f" * 64, database="tenant-1",
                             plan_fingerprint="0" * 64, approver="Ada")
    state = migrate(env="local", database_url_env="TENANT_URL", backup=False,
                    fleet_approval=approval, return_state=True)
    assert state.is_failed()  # it names no fleet run: refused before anything is planned
    assert state.message.startswith("failed at configuration, nothing changed: fleet_approval "
                                    "refused: it names no migrate-fleet run"), state.message
    assert schema_dump(db_url) == before and applied(db_url) == []


def test_a_prefect_variable_can_hold_the_targets_and_a_dry_run_changes_nothing(fleet):
    from prefect.variables import Variable

    targets, urls = fleet
    Variable.set("fleet-targets", targets.read_text(), overwrite=True)
    before = [schema_dump(url) for url in urls]
    state = migrate_fleet(env="local", targets_variable="fleet-targets", dry_run=True, backup=False,
                          return_state=True)
    assert state.is_completed(), state.message
    assert state.message == "dry run: 6 of 6 databases have pending migrations; nothing changed"
    assert [schema_dump(url) for url in urls] == before
    missing = migrate_fleet(env="local", targets_variable="no-such-fleet", return_state=True)
    assert missing.is_failed() and missing.message == (
        "failed at configuration, nothing changed: there is no Prefect Variable no-such-fleet: create "
        "it with the targets document (prefect variable set no-such-fleet ...)")


def test_an_unanswered_fleet_approval_is_a_rejection_and_changes_nothing(fleet):
    targets, urls = fleet
    state = migrate_fleet(env="local", targets=str(targets), require_approval=True, backup=False,
                          approval_timeout_seconds=3, return_state=True)
    assert state.is_failed() and state.message == "rejected (no answer within 3s), nothing changed"
    with get_client(sync_client=True) as client:  # what the UI shows: our words, not Prefect's
        assert client.read_flow_run(state.state_details.flow_run_id).state.message == state.message
    assert all(applied(url) == [] for url in urls)
