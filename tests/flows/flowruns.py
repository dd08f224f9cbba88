"""Helpers of the flow tests: the applied migrations, a run's artifacts, a run in the background."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone

from helpers import query
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterStartTime,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType

from flows.migrate import migrate

APPLIED = "SELECT name FROM migratehistory ORDER BY id"


def applied(url: str) -> list[str]:
    """Return the names in migratehistory (none if it does not exist)."""
    if query(url, "SELECT to_regclass('migratehistory')") == [(None,)]:
        return []
    return [r[0] for r in query(url, APPLIED)]


def artifacts(flow_run_id) -> dict[str, str]:
    """Return the run's artifacts by key."""
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return {a.key: a.data for a in found if a.key}


def wait_for_pause(started: dict, timeout: float = 60):
    """Return the paused run that ``run_in_background`` started; fail after ``timeout`` seconds.

    Runs that an earlier test left paused are not it: only one started since ``started["at"]``.
    """
    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                start_time=FlowRunFilterStartTime(after_=started["at"])))
            if runs:
                return runs[0]
            time.sleep(0.5)
    raise AssertionError("the run never paused for approval")


def run_in_background(**params):
    """Start ``migrate(**params)`` in a thread; return the thread and a dict that gets its "state"
    (and has when it started, "at")."""
    result = {"at": datetime.now(timezone.utc)}
    thread = threading.Thread(target=lambda: result.update(state=migrate(return_state=True, **params)))
    thread.start()
    return thread, result
