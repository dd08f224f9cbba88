"""The `migrate` flow: pending migrations to a database, safely.

resolve target -> tunnel (proxy) -> check connection -> plan + lint -> preflight -> backup (the
rehearsal's copy made meanwhile) -> rehearsal on the copy -> plan artifact -> [dry run stops] ->
approval pause -> plan again (same fingerprint) -> preflight again -> apply (under the lock, phase
by phase: docs/migrations.md) -> post-checks -> on failure the rollback subflow -> tunnel closed in every case.

Run it: ``python flows/migrate.py --env local`` (or ``--env proxy --dry-run``); deployed as
``migrate/migrate-production``. No ``from __future__ import annotations`` here: Prefect reads
the parameter annotations at run time.
"""

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, cast

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# dbcore's own log lines (backup, apply) shown in the run's logs; read when Prefect is imported
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dbcore")
if __name__ == "__main__":  # a terminal run: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed, State
from pydantic import ValidationError

from dbcore.checks.post import CheckReport
from dbcore.connection import Env
from dbcore.deploy import head_start, steps
from dbcore.deploy.fleet import FleetApproval
from dbcore.deploy.plan import DeployPlan
from dbcore.deploy.run import DeployRun, RunOptions, handed_over, handing_over
from dbcore.deploy.steps import ApprovedChange, Models
from dbcore.errors import (
    DbcoreError,
    MigrationFailed,
    NonAtomicFailed,
    PhaseFailed,
    PlanChangedSinceApproval,
)
from dbcore.lint.report import LintReport, md_cell
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import Plan
from dbcore.redact import error_line
from dbcore.services.local import ensure_local_cluster
from dbcore.settings import describe_invalid
from flows import fleet_check, notifications, tasks
from flows.approval import ask_approval
from flows.current import current_flow_run
from flows.deploy_slot import one_deploy_at_a_time
from flows.rollback import rollback_after_failed_apply
from flows.scrub import create_markdown_artifact, scrub

EnvName = Literal["local", "proxy", "production"]


class _RunEnds(Exception):
    """Ends the run early with its final state (raised only where nothing has changed)."""

    def __init__(self, state: State):
        super().__init__(state.message)
        self.state = state


@dataclass(frozen=True)
class _Outcome:
    """What the apply and its post-checks did: the final message is built from it at the end."""

    applied: tuple[str, ...]
    failed_at: Optional[Literal["apply", "post-checks"]] = None
    error: Optional[DbcoreError] = None  # what the apply or the post-checks raised
    checks: Optional[CheckReport] = None  # the post-checks' report, when it found problems
    phase_line: str = ""  # which phase after the batch's commit the apply reached, when it had any
    continued: str = ""  # the runner's line when it only continued the steps an earlier apply left

    def done(self) -> str:
        """The final line of a run that applied (or continued) and passed its post-checks."""
        reached = f"; {self.phase_line}" if self.phase_line else ""
        return self.continued or f"applied {len(self.applied)}: {', '.join(self.applied)}{reached}"

    def problem(self) -> str:
        """Where it failed and why, e.g. "post-checks: ..."."""
        why = self.error if self.error is not None else self.checks.text() if self.checks else "failed"
        return f"{self.failed_at}: {why}"


def _run_name() -> str:
    """Name runs after their environment, so the runs list reads as a deploy log."""
    env = current_flow_run().parameters.get("env") or "auto"
    return f"migrate-{env}"


def _failed_at(stage: str, detail: object) -> State:
    return Failed(message=scrub(f"failed at {stage}, nothing changed: {detail}"))


def _unexpected(stage: str, exc: Exception, secret: Optional[str], what_changed: str) -> State:
    """A bug or an unexpected driver error: one line, and what we know of the database."""
    get_run_logger().exception("unexpected error at %s", stage)
    return Failed(message=scrub(f"failed at {stage} ({type(exc).__name__}: "
                                f"{error_line(exc, secret)}); {what_changed}"))


@contextlib.contextmanager
def _stage(name: str, secret: Optional[str] = None):
    """A step of the part that changes nothing: any error in it ends the run "failed at NAME, nothing changed"."""
    try:
        yield
    except _RunEnds:
        raise
    except ValidationError as exc:
        raise _RunEnds(_failed_at(name, describe_invalid(exc))) from exc
    except DbcoreError as exc:
        raise _RunEnds(_failed_at(name, exc)) from exc
    except Exception as exc:
        raise _RunEnds(_unexpected(name, exc, secret, "nothing changed")) from exc


def _resolve(options: RunOptions) -> DeployRun:
    """Return this run: the one a terminal resolved already (with its head start), else resolved now."""
    run_id = str(current_flow_run().id)
    run = handed_over(options) or DeployRun.resolve(options, start_local=ensure_local_cluster)
    get_run_logger().info("target %s (%s)", run.target.masked_url, run.target.env)
    return run.with_run_id(run_id)


def _through_tunnel(stack: contextlib.ExitStack, run: DeployRun) -> DeployRun:
    """Open the tunnel for the proxy environment (closed with ``stack``); return the run through it."""
    if run.target.env is not Env.PROXY:
        return run
    return run.through(stack.enter_context(tasks.open_tunnel(run.settings)).target_for(run.target))


def _rehearsed_plan(run: DeployRun) -> tuple[DeployPlan, Optional[Models]]:
    """Check, plan and lint, back up, rehearse, publish the plan; return it and the models.

    Raises _RunEnds where the run ends before any approval: up to date, lint, rehearsal, dry run.
    """
    with _stage("connection check", run.secret):
        tasks.check_connection(run)
    with _stage("plan", run.secret):
        plan, lint_report = tasks.make_plan(run)
        # the app's models: imported in the rehearsal's child, by the run only once approved
        models: Optional[Models] = None
    if plan.empty:
        raise _RunEnds(Completed(message="up to date"))
    if not lint_report.ok:
        _stopped_at_lint(run, plan, lint_report)
    backup_info = rehearsal = checked_before = None
    if run.options.backup:
        with _stage("configuration", run.secret):
            server = steps.rehearsal_server(run)  # never production's by default
        with _stage("preflight", run.secret):
            checked_before = tasks.preflight_before_backup(run, plan)
        with _stage("backup", run.secret):
            # the rehearsal's copy is made on that server while the backup uploads
            backup_info, copy = tasks.take_backup(run, plan, server)
        try:
            with _stage("rehearsal", run.secret):
                rehearsal = tasks.rehearse(run, plan, backup_info, models, copy)
        except _RunEnds as ended:  # the migrations failed on the copy: the plan says why too
            _publish_failed_rehearsal(DeployPlan(str(run.target.env), plan, lint_report, backup_info,
                                                 None, checked_before), ended.state.message or "")
            raise
    deploy = DeployPlan(str(run.target.env), plan, lint_report, backup_info, rehearsal, checked_before)
    create_markdown_artifact(deploy.to_markdown(), key="migration-plan", description=deploy.headline())
    get_run_logger().info("plan:\n%s", deploy.text())
    if not deploy.ok:  # the last line names the first thing that stops it
        raise _RunEnds(_failed_at("rehearsal", deploy.stop_reason()))
    if run.options.dry_run:
        raise _RunEnds(Completed(message=f"dry run: would apply {len(plan.migrations)}: "
                                         f"{', '.join(plan.names)}; nothing changed"))
    return deploy, models


def _stopped_at_lint(run: DeployRun, plan: Plan, lint_report: LintReport) -> None:
    """End the run at lint: the findings in the log, both artifacts, the first error in the last line."""
    create_markdown_artifact(lint_report.to_markdown(), key="migration-lint",
                             description="Lint errors stopped the run")
    create_markdown_artifact(DeployPlan(str(run.target.env), plan, lint_report).to_markdown(),
                             key="migration-plan", description="Lint errors stopped the run")
    get_run_logger().error("lint stopped the run:\n%s", lint_report.text())
    raise _RunEnds(_failed_at("lint", f"{lint_report.summary()}: {lint_report.errors[0].text()}"))


def _publish_failed_rehearsal(deploy: DeployPlan, why: str) -> None:
    """The migration-plan artifact of a run whose migrations failed on the copy, saying why."""
    create_markdown_artifact(f"{deploy.to_markdown()}\n\n### Rehearsal on a copy failed\n\n{md_cell(why)}",
                             key="migration-plan", description=why[:200])


def _decide(run: DeployRun, deploy: DeployPlan, fleet_approval: Optional[FleetApproval]
            ) -> tuple[Optional[str], ApprovalRecord]:
    """Ask for the approval where needed; return the actor and the approval record.

    Raises _RunEnds on a refusal.
    """
    fingerprint = deploy.fingerprint
    if fleet_approval is not None:  # the fleet's one approval: only for this very plan
        with _stage("fleet approval check", run.secret):
            actor = fleet_approval.check(deploy.plan) or run.settings.actor or None
        return actor, ApprovalRecord(actor, None, fingerprint)
    if not run.approval_needed:
        return run.settings.actor or None, ApprovalRecord(None, None, fingerprint)
    with _stage("approval", run.secret):
        decision = ask_approval(deploy.to_markdown(), headline=deploy.headline(), target=deploy.target(),
                                fingerprint=fingerprint, timeout=run.options.approval_timeout,
                                consequence="nothing changed")
    if not decision.approved:
        raise _RunEnds(Failed(message=f"{decision.refusal}, nothing changed"))
    with _stage("connection check after the approval", run.secret):
        tasks.check_connection(run)  # an hour may have passed; the tunnel too
    return decision.approver, ApprovalRecord(decision.approver, decision.comment, fingerprint)


def _approve(run: DeployRun, deploy: DeployPlan, models: Optional[Models],
             fleet_approval: Optional[FleetApproval] = None) -> ApprovedChange:
    """Ask for the approval (where needed), make the plan again, snapshot the schema; return what may be applied.

    Raises _RunEnds on a refusal, or when the plan made again is not the one approved.
    """
    actor, approval = _decide(run, deploy, fleet_approval)
    if run.approval_needed:  # the approval covers this plan only: make it again and compare
        try:
            with _stage("plan check before the apply", run.secret):
                again = tasks.plan_again(run, deploy)
        except _RunEnds as ended:
            if isinstance(ended.__cause__, PlanChangedSinceApproval):
                raise _RunEnds(Failed(message=str(ended.__cause__))) from ended.__cause__
            raise
        if again is None:  # another run applied it while this one waited
            raise _RunEnds(Completed(message="up to date (another run applied these meanwhile)"))
    with _stage("preflight", run.secret):
        tasks.preflight_before_apply(run, deploy.plan, deploy.rehearsal)
    with _stage("snapshot", run.secret):
        return tasks.snapshot(run, deploy, models, actor, approval)


def _apply_and_check(run: DeployRun, approved: ApprovedChange) -> _Outcome:
    """Apply the approved plan and post-check it; return what was committed and any problem."""
    try:
        report = tasks.apply(run, approved)
    except PhaseFailed as exc:  # the batch is committed and valid: no rollback, a rerun continues
        raise _RunEnds(Failed(message=f"applied; stopped in phase {exc.phase}, after the batch's commit: "
                                      f"{exc}")) from exc
    except MigrationFailed as exc:
        if not exc.committed and not isinstance(exc, NonAtomicFailed):
            raise _RunEnds(_failed_at("apply", exc)) from exc  # the batch was rolled back
        return _Outcome(tuple(exc.committed), "apply", exc)
    except DbcoreError as exc:  # the lock, a changed plan: refused before any change
        raise _RunEnds(_failed_at("apply", exc)) from exc
    if not report.names and not report.phase_line:  # another run applied them meanwhile
        raise _RunEnds(Completed(message=report.summary()))
    applied = tuple(report.names)  # none when it only continued an earlier apply's steps: checked too
    try:
        checked = tasks.post_checks(run, approved)
    except DbcoreError as exc:
        return _Outcome(applied, "post-checks", exc)
    if not checked.ok:
        create_markdown_artifact(checked.to_markdown(), key="migration-post-checks",
                                 description="Post-checks failed after the apply")
        return _Outcome(applied, "post-checks", checks=checked)
    return _Outcome(applied, phase_line=report.phase_line, continued="" if applied else report.summary())


def _change(run: DeployRun, approved: ApprovedChange) -> State:
    """The part that may change the database: apply, post-checks, the rollback subflow if they fail."""
    may_have_changed = "the database may have changed: check `dbmigrate status`"
    try:
        outcome = _apply_and_check(run, approved)
    except _RunEnds:
        raise
    except Exception as exc:
        return _unexpected("apply", exc, run.secret, may_have_changed)
    if outcome.failed_at is None:
        return Completed(message=outcome.done())
    if not outcome.applied:
        return Failed(message=f"failed at {outcome.problem()}")
    try:
        how = rollback_after_failed_apply(run, list(outcome.applied), approved)
    except DbcoreError as exc:
        return Failed(message=f"failed after apply and the rollback failed too: {exc}")
    except Exception as exc:
        return _unexpected("rollback", exc, run.secret, may_have_changed)
    return Failed(message=f"failed after apply at {outcome.problem()}; rolled back by {how}")


@flow(name="migrate", flow_run_name=_run_name, log_prints=False, validate_parameters=True,
      on_completion=[notifications.run_ended], on_failure=[notifications.run_ended],
      on_crashed=[notifications.run_ended], on_cancellation=[notifications.run_ended])
def migrate(
    env: Optional[EnvName] = None,
    dry_run: bool = False,
    require_approval: Optional[bool] = None,
    approval_timeout_seconds: int = 3600,
    backup: bool = True,
    allow_destructive: bool = False,
    migrations_dir: Optional[str] = None,
    database_url_env: Optional[str] = None,
    fleet_approval: Optional[FleetApproval] = None,
    allow_long_locks: bool = False,
):
    """Apply every pending migration; return a Completed or Failed state whose message says what happened."""
    tasks.show_dbcore_logs()
    options = RunOptions(env, dry_run, backup, allow_destructive, require_approval,
                         approval_timeout_seconds, migrations_dir, database_url_env,
                         allow_long_locks=allow_long_locks)
    try:
        with _stage("configuration"):
            run = _resolve(options)
            # a fleet approval counts only as Prefect's record of the fleet run bears it out
            fleet_approval = fleet_check.verified(fleet_approval, database_url_env, run.live)
        with contextlib.ExitStack() as held:
            if run.live:  # locally, the migration lock keeps applies apart
                with _stage("waiting for another deploy"):
                    held.enter_context(one_deploy_at_a_time(run.target, approval_timeout_seconds + 3600))
            with _stage("tunnel"):
                run = _through_tunnel(held, run)
            with _stage("plan", run.secret):  # up to the apply, any end is "nothing changed"
                deploy, models = _rehearsed_plan(run)
                approved = _approve(run, deploy, models, fleet_approval)
            return _change(run, approved)  # from here on the database may change
    except _RunEnds as ended:
        return ended.state


def _head_start(options: RunOptions) -> Optional[DeployRun]:
    """Resolve the run and begin its backup and copy while Prefect starts its API (None where it cannot).

    Prefect's temporary API takes seconds to start; the backup need not wait for it. Local targets
    only: a live one is backed up only once the run holds its deploy slot, so that a backup never
    overlaps another run's apply. The flow's backup task takes it over for the same plan, else it
    is dropped (dbcore/deploy/head_start.py).
    """
    if not options.backup:
        return None
    try:
        run = DeployRun.resolve(options, start_local=ensure_local_cluster)
        if not run.local():
            return None
        server = steps.rehearsal_server(run)
    except (ValidationError, DbcoreError):
        return None  # the flow says what is wrong, in its own words
    return run.with_head_start(head_start.begin(run.target, run.settings, server,
                                                allow_destructive=options.allow_destructive))


def main(argv: Optional[list] = None) -> int:
    """Run the flow from a terminal: print one line of what happened; exit 0 on success."""
    parser = argparse.ArgumentParser(prog="python flows/migrate.py", description=__doc__.splitlines()[0])
    parser.add_argument("--env", choices=["local", "proxy", "production"],
                        help="assert the environment (it must agree with FLY_APP_NAME / "
                             "USE_FLY_POSTGRES_FROM_LOCAL_PROXY)")
    parser.add_argument("--dry-run", action="store_true",
                        help="back up, rehearse on a copy and show the plan; change nothing")
    parser.add_argument("--approve", dest="require_approval", action="store_const", const=True,
                        default=None, help="pause for approval even locally")
    parser.add_argument("--no-backup", dest="backup", action="store_false",
                        help="local only: skip the backup and the rehearsal")
    parser.add_argument("--allow-destructive", action="store_true",
                        help="allow migrations that drop tables")
    parser.add_argument("--allow-long-locks", action="store_true",
                        help="go on when a table's writes stay blocked longer than "
                             "MIGRATE_LOCK_BUDGET on the copy (recorded in the plan and the audit)")
    parser.add_argument("--migrations-dir", help="default: ./migrations")
    args = parser.parse_args(argv)
    options = RunOptions(args.env, args.dry_run, args.backup, args.allow_destructive,
                         args.require_approval, migrations_dir=args.migrations_dir,
                         allow_long_locks=args.allow_long_locks)
    prepared = _head_start(options)
    try:
        with handing_over(prepared) if prepared else contextlib.nullcontext():
            ran = migrate(env=args.env, dry_run=args.dry_run, require_approval=args.require_approval,
                          backup=args.backup, allow_destructive=args.allow_destructive,
                          migrations_dir=args.migrations_dir,
                          allow_long_locks=args.allow_long_locks, return_state=True)
        state = cast(State, ran)  # a sync flow: the state itself
    finally:
        if prepared is not None and prepared.head_start is not None:
            prepared.head_start.discard()
    print(f"migrate: {state.message or state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
