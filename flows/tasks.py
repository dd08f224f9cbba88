"""Thin Prefect tasks over dbcore: each is one call into dbcore/deploy/steps.py, the run first.

Retries only where repeating is safe (nothing was changed): the connection check, the tunnel, the
backup upload, and the apply only when its transaction was rolled back for a lock timeout.
Nothing is cached: every run must look at the database as it is now.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator, cast
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from dbcore.backup.dump import BackupInfo, database_size
from dbcore.checks.post import CheckReport
from dbcore.connection import server_version
from dbcore.deploy import steps
from dbcore.deploy.plan import DeployPlan
from dbcore.deploy.preflight import PreflightReport
from dbcore.deploy.rehearsal import RehearsalReport, ScratchCopy
from dbcore.deploy.run import DeployRun
from dbcore.deploy.scratch import RehearsalServer
from dbcore.deploy.steps import Models
from dbcore.errors import DbcoreError
from dbcore.lint.report import LintReport
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import Plan, RunReport
from dbcore.proxy import Tunnel
from dbcore.proxy import open_tunnel as start_tunnel
from dbcore.settings import Settings
from flows.scrub import task


def _retry_if_retryable(task, task_run, state) -> bool:
    """Retry only errors dbcore marks as safe to repeat (nothing was changed)."""
    try:
        state.result()
    except DbcoreError as exc:
        return exc.retryable
    except Exception:
        return False
    return False


@task(name="open-tunnel", retries=2, retry_delay_seconds=[3, 10],
      retry_condition_fn=_retry_if_retryable, cache_policy=NO_CACHE)
def open_tunnel(settings: Settings) -> Tunnel:
    """Start the proxy tunnel and return it once it accepts connections (retried: it changes nothing)."""
    tunnel = start_tunnel(settings)
    get_run_logger().info("tunnel %s listening on 127.0.0.1:%s", tunnel.program, tunnel.local_port)
    return tunnel


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a flow or task run (dbcore is used elsewhere too)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


def show_dbcore_logs() -> None:
    """Send dbcore's log lines to the run's logs (PREFECT_LOGGING_EXTRA_LOGGERS does only before Prefect's import)."""
    dbcore_log = logging.getLogger("dbcore")
    if not any(isinstance(h, APILogHandler) for h in dbcore_log.handlers):
        dbcore_log.addHandler(_RunLogHandler())
    if dbcore_log.level == logging.NOTSET or dbcore_log.level > logging.INFO:
        dbcore_log.setLevel(logging.INFO)


@task(name="check-connection", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def check_connection(run: DeployRun) -> str:
    """Connect once and return the server version."""
    return server_version(run.target)


@task(name="plan", cache_policy=NO_CACHE)
def make_plan(run: DeployRun) -> tuple[Plan, LintReport]:
    """Return the pending migrations and the lint report over the ones that will run."""
    return steps.plan_and_lint(run)


class _ProgressArtifact:
    """Turns a bytes-so-far callback into a Prefect progress artifact, updated at most once a second."""

    def __init__(self, key: str, total_bytes: int, what: str):
        self.total, self.what, self.last = max(total_bytes, 1), what, 0.0
        self.id = cast(UUID, create_progress_artifact(0.0, key=key, description=what))  # sync here

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            percent = min(99.0, 100.0 * done / self.total)
            update_progress_artifact(self.id, percent,
                                     description=f"{self.what}: {done / 2**20:.1f} MiB so far")

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0, description=f"{self.what}: done")


@contextmanager
def _progress(key: str, total_bytes: int, what: str, shown: bool = True) -> Iterator[_ProgressArtifact | None]:
    """A progress artifact for the block (None when not ``shown``), marked done when the block ends."""
    meter = _ProgressArtifact(key, total_bytes, what) if shown else None
    yield meter
    if meter is not None:
        meter.finish()


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_before_backup(run: DeployRun, plan: Plan) -> PreflightReport:
    """Wait until nothing on the live database blocks the backup; fail naming what still does."""
    return _logged(steps.preflight_before_backup(run, plan))


@task(name="preflight", cache_policy=NO_CACHE)
def preflight_before_apply(run: DeployRun, plan: Plan, rehearsal: RehearsalReport | None) -> PreflightReport:
    """Wait until nothing on the live database blocks the apply; fail naming what still does."""
    return _logged(steps.preflight_before_apply(run, plan, rehearsal))


def _logged(report: PreflightReport) -> PreflightReport:
    get_run_logger().info("%s", report.text())
    return report


@task(name="backup", retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=_retry_if_retryable,
      cache_policy=NO_CACHE)
def take_backup(run: DeployRun, plan: Plan, server: RehearsalServer | None = None
                ) -> tuple[BackupInfo, ScratchCopy | None]:
    """Back the database up to S3 (and, given ``server``, make the rehearsal's copy there meanwhile)."""
    size = database_size(run.target)  # the compressed size is unknown: a third of it bounds it well
    with _progress("backup-progress", size, f"backup of {run.target.dbname}") as meter, \
            _progress("rehearsal-restore-progress", size // 3, "the rehearsal's copy on "
                      f"{server.where if server else ''}", shown=server is not None) as restoring:
        return steps.backup(run, plan, server, progress=meter, restore_progress=restoring)


@task(name="rehearse-on-copy", cache_policy=NO_CACHE)
def rehearse(run: DeployRun, plan: Plan, backup_info: BackupInfo, models: Models | None,
             copy: ScratchCopy | None = None) -> RehearsalReport:
    """Apply the plan on the copy (else on the backup restored now), check it, drop it."""
    with _progress("rehearsal-restore-progress", backup_info.size, f"restore of {backup_info.key} "
                   "into a scratch copy", shown=copy is None) as meter:
        return steps.rehearse(run, plan, backup_info, models, copy, restore_progress=meter)


@task(name="plan-check", cache_policy=NO_CACHE)
def plan_again(run: DeployRun, deploy: DeployPlan) -> Plan | None:
    """Make the plan again and compare it with the one approved (None: applied meanwhile)."""
    return steps.plan_again(run, deploy)


@task(name="schema-snapshot", cache_policy=NO_CACHE)
def snapshot(run: DeployRun, deploy: DeployPlan, models: Models | None, actor: str | None,
             approval: ApprovalRecord) -> steps.ApprovedChange:
    """Return the approved change with the schema and drift as they are now (to judge after the apply)."""
    return steps.snapshot_before(run, deploy, models, actor, approval)


@task(name="apply", retries=3, retry_delay_seconds=[5, 15, 30], retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_retryable, cache_policy=NO_CACHE)
def apply(run: DeployRun, approved: steps.ApprovedChange) -> RunReport:
    """Apply the plan under the migration lock; a table lock timeout is retried inside
    (dbcore.migrate.retry), the task's own retries are for a busy migration lock or a lost connection."""
    return steps.apply(run, approved, phase_progress=_PhaseArtifact(get_run_logger()))


class _PhaseArtifact:
    """Logs the steps after the batch's commit; a backfill's progress goes to a Prefect progress artifact."""

    def __init__(self, logger) -> None:
        self.logger, self.last = logger, 0.0
        self.ids: dict = {}

    def __call__(self, event) -> None:
        now = time.monotonic()
        if event.total and event.done < event.total and now - self.last < 1.0:
            return  # a backfill reports every batch: once a second is enough
        self.last = now
        self.logger.info("[phase %s] %s: %s", event.phase, event.step, event.message)
        if event.total:
            self.progress(event)

    def progress(self, event) -> None:
        if event.step not in self.ids:
            self.ids[event.step] = create_progress_artifact(0.0, description=f"backfill {event.step}")
        update_progress_artifact(self.ids[event.step], 100.0 * event.done / event.total,
                                 description=f"backfill {event.step}: {event.message}")


@task(name="post-checks", cache_policy=NO_CACHE)
def post_checks(run: DeployRun, approved: steps.ApprovedChange) -> CheckReport:
    """Return the drift and invalid-index checks of the live database (judged against before the apply)."""
    return steps.post_checks(run, approved)
