"""Two promises checked across a whole run: the rehearsal copy never lands on the target's cluster
when another server is named, and no password or S3 secret reaches output, logs, artifacts or
Prefect's stored state."""

from __future__ import annotations

import threading
import time

from fixtures_s3 import S3_SECRET_KEY
from helpers import query
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    LogFilter,
    LogFilterFlowRunId,
)

from flows.migrate import migrate

SCRATCH = "SELECT datname FROM pg_database WHERE datname LIKE '%\\_rehearsal\\_%'"


class _Watcher:
    """Polls a server's database list every 20 ms and keeps every scratch name it sees."""

    def __init__(self, server_url: str):
        self.url, self.seen, self._stop = server_url, set(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.seen |= {row[0] for row in query(self.url, SCRATCH)}
            time.sleep(0.02)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)


def test_with_a_rehearsal_server_no_scratch_database_appears_on_the_target_cluster(
        flow_env, db_url, pg_server_url, other_pg_server_url, app_at_003, monkeypatch):
    monkeypatch.setenv("FLY_APP_NAME", "myapp")  # production: the cluster to protect
    monkeypatch.setenv("MIGRATE_REHEARSAL_DATABASE_URL", other_pg_server_url)
    with _Watcher(pg_server_url) as on_target, _Watcher(other_pg_server_url) as elsewhere:
        state = migrate(dry_run=True, return_state=True)
    assert state.is_completed(), state.message
    assert on_target.seen == set()
    assert len(elsewhere.seen) == 1  # the copy was made, and seen, on the named server
    assert query(other_pg_server_url, SCRATCH) == []  # and dropped
    with get_client(sync_client=True) as client:
        plan = [a.data for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[state.state_details.flow_run_id])))
                if a.key == "migration-plan"][0]
    assert "on MIGRATE_REHEARSAL_DATABASE_URL (127.0.0.1:" in plan


def _everything_prefect_stored(flow_run_id) -> str:
    """The flow run, its task runs, logs and artifacts, as Prefect's API returns them."""
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        found = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
        states = client.read_flow_run_states(flow_run_id)
    parts = [run.model_dump_json()] + [t.model_dump_json() for t in tasks]
    parts += [entry.model_dump_json() for entry in logs] + [a.model_dump_json() for a in found]
    parts += [s.model_dump_json() for s in states]
    return "\n".join(parts)


def test_no_password_or_s3_secret_in_output_logs_artifacts_or_prefect_state(
        flow_env, db_url, migrations_dir, monkeypatch, capfd, caplog):
    password = "Pw-" + "7f3a9c1e5b"
    monkeypatch.setenv("DATABASE_URL", db_url.replace("postgres@", f"postgres:{password}@"))
    applied = migrate(return_state=True)  # backup, rehearsal, apply, post-checks
    assert applied.is_completed(), applied.message
    (migrations_dir / "005_bad.py").write_text(
        "def migrate(migrator, database, *, fake=False):\n"
        "    migrator.sql(\"ALTER TABLE nope ADD COLUMN x int\")\n\n"
        "def rollback(migrator, database, *, fake=False):\n    pass\n")
    failed = migrate(return_state=True)  # fails in the rehearsal, with the database's error
    assert failed.is_failed() and "nope" in failed.message
    monkeypatch.setenv("DATABASE_URL", f"postgres://app:{password}@127.0.0.1:1/app")
    unreachable = migrate(return_state=True)  # the connection error names the server
    assert unreachable.is_failed() and "127.0.0.1:1" in unreachable.message

    stored = "\n".join(_everything_prefect_stored(s.state_details.flow_run_id)
                       for s in (applied, failed, unreachable))
    captured = capfd.readouterr()
    seen = "\n".join([stored, captured.out, captured.err, caplog.text,
                      applied.message, failed.message, unreachable.message])
    assert "applied 4" in seen and "***" in seen  # the text really was collected, masked
    assert password not in seen
    assert S3_SECRET_KEY not in seen
