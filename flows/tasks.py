"""Thin Prefect tasks over dbcore: each body is a call or three into dbcore.

Retries only where repeating is safe (STYLE.md habit 5): the connection check, the tunnel, the
backup upload, and the apply only when its transaction was rolled back for a lock timeout.
Nothing is cached: every run must look at the database as it is now.
"""

from __future__ import annotations

import logging
import time

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from dbcore.backup import dump as backup
from dbcore.checks import post as checks
from dbcore.connection import Env, Target, server_version
from dbcore.deploy import head_start, recovery, rehearsal, scratch, touched
from dbcore.deploy import preflight as preflight_checks
from dbcore.errors import DbcoreError
from dbcore.lint import engine as lint
from dbcore.lint.report import LintReport
from dbcore.migrate import plan as planning
from dbcore.migrate import retry
from dbcore.migrate.history import ApprovalRecord
from dbcore.settings import Settings

#: backups begun in this process before the flow started (flows/migrate.py main()); a task
#: takes one over only for the very plan it was begun for (dbcore/deploy/head_start.py)
HEAD_STARTS: list[head_start.HeadStart] = []


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
def open_tunnel(settings: Settings):
    """Start the proxy tunnel and return it once it accepts connections (retried: it changes nothing)."""
    from dbcore.proxy import open_tunnel as start

    tunnel = start(settings)
    get_run_logger().info("tunnel %s listening on 127.0.0.1:%s", tunnel.program, tunnel.local_port)
    return tunnel


class _RunLogHandler(APILogHandler):
    """Prefect's API log handler, silent outside a flow or task run (dbcore is used elsewhere too)."""

    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is not None or TaskRunContext.get() is not None:
            super().emit(record)


def show_dbcore_logs() -> None:
    """Send dbcore's log lines (backup, apply, restore) to the run's logs.

    PREFECT_LOGGING_EXTRA_LOGGERS does this only when set before Prefect is imported, which a
    worker or `serve` process has long done by the time it loads this flow.
    """
    dbcore_log = logging.getLogger("dbcore")
    if not any(isinstance(h, APILogHandler) for h in dbcore_log.handlers):
        dbcore_log.addHandler(_RunLogHandler())
    if dbcore_log.level == logging.NOTSET or dbcore_log.level > logging.INFO:
        dbcore_log.setLevel(logging.INFO)


@task(name="check-connection", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def check_connection(target: Target) -> str:
    """Connect once and return the server version."""
    return server_version(target)


@task(name="plan", cache_policy=NO_CACHE)
def make_plan(target: Target, settings: Settings, allow_destructive: bool
              ) -> tuple[planning.Plan, LintReport]:
    """Return the pending migrations and the lint report over the ones that will run."""
    plan = planning.plan_apply(target, settings)
    return plan, lint.lint_pending(settings.migrations_dir, [m.path for m in plan.migrations],
                                   allow_destructive=allow_destructive)


class _ProgressArtifact:
    """Turns a bytes-so-far callback into a Prefect progress artifact, updated at most once a second."""

    def __init__(self, key: str, total_bytes: int, what: str):
        self.total, self.what, self.last = max(total_bytes, 1), what, 0.0
        self.id = create_progress_artifact(0.0, key=key, description=what)

    def __call__(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last >= 1.0:
            self.last = now
            percent = min(99.0, 100.0 * done / self.total)
            update_progress_artifact(self.id, percent,
                                     description=f"{self.what}: {done / 2**20:.1f} MiB so far")

    def finish(self) -> None:
        update_progress_artifact(self.id, 100.0, description=f"{self.what}: done")


def rehearsal_server(target: Target, settings: Settings) -> scratch.RehearsalServer:
    """Return where the rehearsal copy is made (not a task: it decides, from the settings).

    The proxy environment rehearses on the laptop's embedded cluster, started here if needed.
    """
    local = None
    if target.env is Env.PROXY and settings.rehearsal_database_url is None:
        from dbcore.services.local import ensure_local_cluster

        local = ensure_local_cluster(settings)
    return scratch.rehearsal_server(target, settings, local)


def touched_tables(plan: planning.Plan, rehearsal_report: rehearsal.RehearsalReport | None = None
                   ) -> set[str] | None:
    """Return the tables the plan touches: from the rehearsal's SQL, else from the files."""
    captured = ([s for r in rehearsal_report.results for s in r.sql] if rehearsal_report
                else None)
    return touched.tables_of_plan([m.path for m in plan.migrations], captured)


@task(name="preflight", cache_policy=NO_CACHE)
def preflight(target: Target, settings: Settings, plan: planning.Plan, stage: str,
              rehearsal_report: rehearsal.RehearsalReport | None = None
              ) -> preflight_checks.PreflightReport:
    """Wait until nothing on the live database blocks the run; fail naming what still does.

    Before the backup, a head start of this very plan has checked already (and its pg_dump,
    running now, is no blocker of its own run).
    """
    head = next((h for h in HEAD_STARTS if stage == "before the backup"
                 and h.matches(plan, target) and h.checked is not None), None)
    report = head.checked if head else preflight_checks.preflight(
        target, settings, touched_tables(plan, rehearsal_report), stage)
    get_run_logger().info("%s", report.text())
    return report


@task(name="backup", retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=_retry_if_retryable,
      cache_policy=NO_CACHE)
def take_backup(target: Target, settings: Settings, plan: planning.Plan,
                server: scratch.RehearsalServer | None = None, run_id: str = ""
                ) -> tuple[backup.BackupInfo, rehearsal.ScratchCopy | None]:
    """Back the database up to S3 (and, given ``server``, make the rehearsal's copy there meanwhile).

    Returns what was stored and the copy (None without one), progress artifacts for both
    meanwhile. A head start of this very plan (``python flows/migrate.py`` begins it while
    Prefect starts) is taken over instead of starting again.
    """
    size = backup.database_size(target)
    meter = _ProgressArtifact("backup-progress", size, f"backup of {target.dbname}")
    # the compressed size is unknown until the end: a third of the database bounds it well
    restoring = None if server is None else _ProgressArtifact(
        "rehearsal-restore-progress", size // 3, f"the rehearsal's copy on {server.where}")
    head = next((h for h in HEAD_STARTS if server is not None and h.claim(plan, target)), None)
    if head is not None:
        get_run_logger().info("taking over the backup and copy begun while Prefect started")
        while not head.wait(timeout=1.0):
            meter(head.dumped)
            restoring(head.restored)
        info, copy = head.outcome()
    elif server is None:
        info, copy = backup.backup_to_s3(target, settings, progress=meter), None
    else:
        info, copy = rehearsal.backup_into_copy(target, server, settings, run_id or "",
                                                progress=meter, restore_progress=restoring)
    meter.finish()
    if restoring:
        restoring.finish()
    get_run_logger().info("backup stored: %s (%s bytes, sha256 %s)", info.key, info.size, info.sha256)
    if copy is not None:
        get_run_logger().info("rehearsal copy %s made on %s (%s)", copy.target.dbname,
                              copy.server.where, copy.method)
    return info, copy


@task(name="rehearse-on-copy", cache_policy=NO_CACHE)
def rehearse(plan: planning.Plan, target: Target, settings: Settings, backup_info: backup.BackupInfo,
             models, run_id: str, allow_destructive: bool,
             copy: rehearsal.ScratchCopy | None = None) -> rehearsal.RehearsalReport:
    """Apply the plan on the copy (else on the backup restored now, where the rehearsal runs),
    check it, drop it."""
    meter = None if copy else _ProgressArtifact(
        "rehearsal-restore-progress", backup_info.size, f"restore of {backup_info.key} into a scratch copy")
    report = rehearsal.rehearse_on_copy(plan, target, settings, backup_info.key, copy=copy,
                                        server=None if copy else rehearsal_server(target, settings),
                                        models=models, run_id=run_id,
                                        allow_destructive=allow_destructive, restore_progress=meter)
    if meter:
        meter.finish()
    return report


@task(name="schema-snapshot", cache_policy=NO_CACHE)
def snapshot(target: Target) -> str:
    """Return the schema as it is now (to verify a rollback against)."""
    return recovery.schema_snapshot(target)


@task(name="apply", retries=3, retry_delay_seconds=[5, 15, 30], retry_jitter_factor=0.5,
      retry_condition_fn=_retry_if_retryable, cache_policy=NO_CACHE)
def apply(plan: planning.Plan, target: Target, settings: Settings, actor: str, run_id: str,
          approval: ApprovalRecord) -> planning.RunReport:
    """Apply the plan in one transaction under the migration lock.

    A table lock timeout is retried inside, with jittered backoff (dbcore.migrate.retry); the
    task's own retries are for a busy migration lock or a lost connection (nothing changed).
    """
    logger = get_run_logger()

    def progress(event: planning.ProgressEvent) -> None:
        if event.stage == "done":
            logger.info("[%s/%s] applied %s in %.2fs", event.index, event.total, event.name,
                        event.seconds)

    return retry.apply_retrying(plan, target, settings, actor=actor, run_id=run_id,
                                progress=progress, approval=approval,
                                phase_progress=_PhaseArtifact(logger))


class _PhaseArtifact:
    """Logs the steps after the batch's commit; a backfill's progress goes to a Prefect progress artifact."""

    def __init__(self, logger) -> None:
        self.logger, self.ids, self.last = logger, {}, 0.0

    def __call__(self, event) -> None:
        now = time.monotonic()
        if event.total and event.done < event.total and now - self.last < 1.0:
            return  # a backfill reports every batch: once a second is enough
        self.last = now
        self.logger.info("[phase %s] %s: %s", event.phase, event.step, event.message)
        if event.total:
            if event.step not in self.ids:
                self.ids[event.step] = create_progress_artifact(0.0, description=f"backfill {event.step}")
            update_progress_artifact(self.ids[event.step], 100.0 * event.done / event.total,
                                     description=f"backfill {event.step}: {event.message}")


@task(name="post-checks", cache_policy=NO_CACHE)
def post_checks(target: Target, models, before=None) -> checks.CheckReport:
    """Return the drift and invalid-index checks of the live database (judged against ``before``)."""
    return checks.run_post_checks(target, models, before=before)


@task(name="drift-before", cache_policy=NO_CACHE)
def drift_before(target: Target, models):
    """Return the drift of the live database before the apply (None without models)."""
    return checks.drift_before(target, models)
