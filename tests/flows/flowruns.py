"""Helpers of the flow tests: the applied migrations, a run's artifacts, a run in the background."""

from __future__ import annotations

import threading
from datetime import datetime, timezone

from helpers import query, wait_until
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


def run_in_background(**params):
    """Start ``migrate(**params)`` in a thread; return the thread and a dict that gets its "state"
    (and has when it started, "at")."""
    result = {"at": datetime.now(timezone.utc)}
    thread = threading.Thread(target=lambda: result.update(state=migrate(return_state=True, **params)))
    thread.start()
    return thread, result


def wait_for_pause(thread: threading.Thread, result: dict, timeout: float = 60):
    """Return the run ``run_in_background`` started once it is paused for approval; fail if the
    run ends or takes too long. Runs an earlier test left paused are not it."""
    found: list = []

    def paused() -> bool:
        with get_client(sync_client=True) as client:
            found[:] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])),
                start_time=FlowRunFilterStartTime(after_=result["at"])))
        return bool(found)

    wait_until(paused, "the run to pause for approval", timeout=timeout,
               gave_up=lambda: not thread.is_alive(), log=lambda: f"the run ended: {result}",
               interval=0.5)
    return found[0]


def final_state(thread: threading.Thread, result: dict, timeout: float = 120):
    """Return the run's final state once its thread ended; fail if it raised or took too long."""
    thread.join(timeout)
    assert "state" in result, f"the run did not end within {timeout:g}s, or raised (see stderr)"
    return result["state"]


#: models that disagree with what the sample's 004 builds (a difference the batch introduces: one
#: that was there before the apply would only be a note), so that the post-checks fail after it
MODELS_AHEAD = """\
import peewee as pw
from dbcore.models import Document, Project, SourceDir

class SourceDirAhead(SourceDir):
    language = pw.CharField(max_length=5)  # 004 adds it as varchar(2)

    class Meta:
        table_name = "sourcedir"
        indexes = ((("project", "path", "language"), True),)

MODELS = [Project, SourceDirAhead, Document]
"""


def use_models_ahead(monkeypatch, folder) -> None:
    """Set MIGRATE_MODELS to :data:`MODELS_AHEAD`, written as a module in ``folder``."""
    (folder / "models_ahead.py").write_text(MODELS_AHEAD)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv("MIGRATE_MODELS", "models_ahead:MODELS")
