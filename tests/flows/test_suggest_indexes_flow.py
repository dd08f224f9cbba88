"""The `suggest-indexes` flow publishes the proposals as an artifact, and its deployment loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from advise_workload import make_workload
from flowruns import artifacts
from prefect.flows import load_flow_from_entrypoint

from flows.suggest_indexes import suggest_indexes

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workload_url(pg_server_url):
    yield from make_workload(pg_server_url)


def test_the_flow_publishes_the_proposals(workload_url, prefect_api, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", workload_url)
    monkeypatch.setenv("MIGRATE_LOCAL_DIR", str(tmp_path / ".local"))
    state = suggest_indexes(env="local", return_state=True)
    assert state.is_completed(), state.message
    table = artifacts(state.state_details.flow_run_id)["index-proposals"]
    assert state.message.startswith("2 index(es) proposed for advise_"), table
    table = artifacts(state.state_details.flow_run_id)["index-proposals"]
    assert "CREATE INDEX CONCURRENTLY customers_email_idx ON customers (email)" in table
    assert "CREATE INDEX CONCURRENTLY orders_sku_idx ON orders (sku)" in table
    assert "status" not in table.split("Already indexed")[0]


def test_a_bad_queries_file_fails_the_run_in_one_line(workload_url, prefect_api, monkeypatch, tmp_path):
    monkeypatch.setenv("DATABASE_URL", workload_url)
    state = suggest_indexes(env="local", queries_file=str(tmp_path / "missing.sql"), return_state=True)
    assert state.is_failed()
    assert state.message.startswith("failed, nothing changed: cannot read --queries")


def test_the_scheduled_deployment_points_at_the_flow():
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    [deployment] = [d for d in spec["deployments"] if d["name"] == "suggest-indexes-weekly"]
    assert deployment["schedules"][0]["cron"]
    loaded = load_flow_from_entrypoint(str(REPO / deployment["entrypoint"]))
    assert loaded.name == "suggest-indexes"
