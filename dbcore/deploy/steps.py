"""The steps of a deploy run, each one call for the flow's task: the decisions live here, not in flows/.

Every step takes the :class:`~dbcore.deploy.run.DeployRun` first. The flow (flows/migrate.py)
strings them together, with Prefect's retries, artifacts and approval pause around them; nothing
here imports Prefect, so the CLI and the tests use the same rules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import peewee

from dbcore.backup.dump import BackupInfo, BytesProgress, backup_to_s3
from dbcore.checks.data import DataChecks
from dbcore.checks.drift import DriftReport
from dbcore.checks.post import CheckReport, drift_before, load_models, run_post_checks
from dbcore.deploy import plan as plans
from dbcore.deploy import preflight as preflights
from dbcore.deploy.plan import DeployPlan, plan_changes
from dbcore.deploy.recovery import schema_snapshot
from dbcore.deploy.rehearsal import RehearsalReport, ScratchCopy, backup_into_copy, rehearse_on_copy
from dbcore.deploy.run import DeployRun
from dbcore.deploy.scratch import RehearsalServer
from dbcore.deploy.scratch import rehearsal_server as server_for
from dbcore.deploy.touched import tables_of_plan
from dbcore.errors import PlanChangedSinceApproval
from dbcore.lint.report import LintReport
from dbcore.migrate import retry
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import Plan, ProgressEvent, RunReport
from dbcore.migrate.sqlcheck import SameSqlAsRehearsed, rehearsed_sql

log = logging.getLogger(__name__)

Models = list[type[peewee.Model]]


def plan_and_lint(run: DeployRun) -> tuple[Plan, LintReport]:
    """Return the pending migrations and the lint report over the ones that will run."""
    return plans.plan_and_lint(run.target, run.settings, allow_destructive=run.options.allow_destructive)


def rehearsal_server(run: DeployRun) -> RehearsalServer:
    """Return where the rehearsal copy is made: never production's cluster unless told
    (dbcore/deploy/scratch.py); the proxy environment's is the laptop's embedded cluster."""
    return server_for(run.target, run.settings, start_local=run.start_local)


def touched_tables(plan: Plan, rehearsal: RehearsalReport | None = None) -> set[str] | None:
    """Return the tables the plan touches: from the rehearsal's SQL, else from the files."""
    captured = [s for r in rehearsal.results for s in r.sql] if rehearsal else None
    return tables_of_plan([m.path for m in plan.migrations], captured)


def preflight_before_backup(run: DeployRun, plan: Plan) -> preflights.PreflightReport:
    """Wait until nothing blocks the backup; a head start of this very plan has checked already
    (and its pg_dump, running now, is no blocker of its own run)."""
    head = run.head_start
    if head is not None and head.matches(plan, run.target) and head.checked is not None:
        return head.checked
    return preflights.preflight(run.target, run.settings, touched_tables(plan),
                                preflights.BEFORE_BACKUP)


def preflight_before_apply(run: DeployRun, plan: Plan,
                           rehearsal: RehearsalReport | None = None) -> preflights.PreflightReport:
    """Wait until nothing on the live database blocks the apply; raise PreflightFailed naming what does."""
    return preflights.preflight(run.target, run.settings, touched_tables(plan, rehearsal),
                                preflights.BEFORE_APPLY)


def backup(run: DeployRun, plan: Plan, server: RehearsalServer | None = None, *,
           progress: BytesProgress | None = None, restore_progress: BytesProgress | None = None
           ) -> tuple[BackupInfo, ScratchCopy | None]:
    """Back the database up to S3 (and, given ``server``, make the rehearsal's copy there meanwhile).

    A head start of this very plan is taken over instead of starting again.
    """
    head = run.head_start
    if server is not None and head is not None and head.claim(plan, run.target):
        log.info("taking over the backup and copy begun while Prefect started")
        info, copy = head.follow(progress, restore_progress)
    elif server is None:
        info, copy = backup_to_s3(run.target, run.settings, progress=progress), None
    else:
        info, copy = backup_into_copy(run.target, server, run.settings, run.run_id,
                                      progress=progress, restore_progress=restore_progress)
    log.info("backup stored: %s (%s bytes, sha256 %s)", info.key, info.size, info.sha256)
    if copy is not None:
        log.info("rehearsal copy %s made on %s (%s)", copy.target.dbname, copy.server.where,
                 copy.method)
    return info, copy


def rehearse(run: DeployRun, plan: Plan, backup_info: BackupInfo, models: Models | None,
             copy: ScratchCopy | None = None, *, restore_progress: BytesProgress | None = None
             ) -> RehearsalReport:
    """Apply the plan on the copy (else on the backup restored now, where the rehearsal runs), check it, drop it.

    The migration code runs in a child process whose DATABASE_URL is the copy; so do the
    application's models (``MIGRATE_MODELS``) when ``models`` is None: imported there, not here.
    """
    return rehearse_on_copy(plan, run.target, run.settings, backup_info.key, copy=copy,
                            server=None if copy else rehearsal_server(run),
                            models=models if models is not None else run.settings.models,
                            run_id=run.run_id, allow_destructive=run.options.allow_destructive,
                            restore_progress=restore_progress,
                            allow_long_locks=run.options.allow_long_locks)


def plan_again(run: DeployRun, deploy: DeployPlan) -> Plan | None:
    """Make the plan again right before the apply: the approval covers the plan of one fingerprint.

    Returns it, or None when another run applied it meanwhile; raises PlanChangedSinceApproval.
    """
    again, _ = plan_and_lint(run)
    if again.empty:
        return None
    if deploy.fingerprint_of(again) != deploy.fingerprint:  # the files, the folder, the rehearsed SQL
        raise PlanChangedSinceApproval(
            f"plan changed since it was approved, nothing changed: {plan_changes(deploy.plan, again)}; "
            "run again and approve the new plan")
    return again


@dataclass(frozen=True)
class ApprovedChange:
    """What the part of a run that changes nothing hands to the part that may: the plan, approved."""

    plan: Plan
    models: Models | None
    backup_key: str | None
    actor: str | None
    schema_before: str  # to verify a rollback against
    drift_before: DriftReport | None  # the live database's drift before the apply, judged after it
    approval: ApprovalRecord  # who approved (if anyone), why, and the fingerprint of the plan
    #: the SQL the rehearsal sent, by migration: the apply sends the same (dbcore.migrate.sqlcheck)
    rehearsed: dict[str, tuple[str, ...]] | None = None


def snapshot_before(run: DeployRun, deploy: DeployPlan, models: Models | None, actor: str | None,
                    approval: ApprovalRecord) -> ApprovedChange:
    """Take the schema snapshot and the drift of the live database right before the apply.

    ``models`` None: the application's models (``MIGRATE_MODELS``) are imported now, approved.
    The lock budget breaches that were allowed go into the approval's comment: the audit rows.
    """
    if models is None:
        models = load_models(run.settings.models)
    rehearsed = rehearsed_sql(deploy.rehearsal.results) if deploy.rehearsal else None
    return ApprovedChange(deploy.plan, models, deploy.backup.key if deploy.backup else None, actor,
                          schema_snapshot(run.target), drift_before(run.target, models),
                          deploy.record_allowances(approval), rehearsed)


def apply(run: DeployRun, approved: ApprovedChange, phase_progress=None) -> RunReport:
    """Apply the plan under the migration lock, a table lock timeout retried with jittered backoff.

    In a child process (an exit is a failure naming the file); it stops where it would send
    other SQL than the rehearsal did (dbcore.migrate.sqlcheck). ``phase_progress`` is told the
    steps after the batch's commit (dbcore.migrate.phases).
    """
    observers = [SameSqlAsRehearsed(approved.rehearsed)] if approved.rehearsed else []
    return retry.apply_retrying(approved.plan, run.target, run.settings, actor=approved.actor,
                                run_id=run.run_id, progress=_log_applied, approval=approved.approval,
                                observers=observers, phase_progress=phase_progress)


def post_checks(run: DeployRun, approved: ApprovedChange) -> CheckReport:
    """Return the drift and invalid-index checks of the live database, judged against before the
    apply, and the team's data checks of the migrations applied (dbcore/checks/data.py)."""
    data = DataChecks.of(run.settings, [m.path for m in approved.plan.migrations], rehearsal=False)
    return run_post_checks(run.target, approved.models, before=approved.drift_before, data=data)


def _log_applied(event: ProgressEvent) -> None:
    if event.stage == "done":
        log.info("[%s/%s] applied %s in %.2fs", event.index, event.total, event.name, event.seconds)
