"""The `migrate` flow: pending migrations to a database, safely.

resolve target -> tunnel (proxy) -> check connection -> plan + lint -> preflight -> backup (the
rehearsal's copy made meanwhile) -> rehearsal on the copy -> plan artifact -> [dry run stops] ->
approval pause -> plan again (same fingerprint) -> preflight again -> apply (one transaction,
lock) -> post-checks -> on failure the rollback subflow -> tunnel closed in every case.

Run it: ``python flows/migrate.py --env local`` (or ``--env proxy --dry-run``); deployed as
``migrate/migrate-production``. No ``from __future__ import annotations`` here: Prefect reads
the parameter annotations at run time (FIELD_NOTES).
"""

import argparse
import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# dbcore's own log lines (backup, apply) shown in the run's logs; read when Prefect is imported
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dbcore")
if __name__ == "__main__":  # a terminal run: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.context import get_run_context
from prefect.states import Completed, Failed, State
from pydantic import ValidationError

from dbcore.checks.post import load_models
from dbcore.connection import Env, Target, resolve_target
from dbcore.deploy import head_start, policy
from dbcore.deploy.fleet import FleetApproval
from dbcore.deploy.plan import DeployPlan, plan_changes, plan_fingerprint
from dbcore.errors import DbcoreError, MigrationFailed, NonAtomicFailed, PhaseFailed
from dbcore.migrate.history import ApprovalRecord
from dbcore.migrate.plan import Plan
from dbcore.redact import error_line
from dbcore.settings import Settings, describe_invalid
from flows import notifications, tasks
from flows.approval import ask_approval
from flows.deploy_slot import one_deploy_at_a_time
from flows.rollback import rollback_after_failed_apply

EnvName = Literal["local", "proxy", "production"]


class _RunEnds(Exception):
    """Ends the run early with its final state (raised only where nothing has changed)."""

    def __init__(self, state: State):
        super().__init__(state.message)
        self.state = state


@dataclass(frozen=True)
class _Approved:
    """What the part that changes nothing hands to the part that may: the plan, approved."""

    plan: Plan
    models: list
    backup_key: Optional[str]
    actor: Optional[str]
    schema_before: str
    drift_before: object  # the live database's drift before the apply, judged against after it
    approval: ApprovalRecord  # who approved (if anyone), why, and the fingerprint of the plan


def _run_name() -> str:
    """Name runs after their environment, so the runs list reads as a deploy log."""
    env = get_run_context().flow_run.parameters.get("env") or "auto"
    return f"migrate-{env}"


def _failed_at(stage: str, detail: object) -> Failed:
    return Failed(message=f"failed at {stage}, nothing changed: {detail}")


def _unexpected(stage: str, exc: Exception, secret: Optional[str], what_changed: str) -> Failed:
    """A bug or an unexpected driver error: one line, and what we know of the database."""
    get_run_logger().exception("unexpected error at %s", stage)
    return Failed(message=f"failed at {stage} ({type(exc).__name__}: {error_line(exc, secret)}); "
                          f"{what_changed}")


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


def _configure(env: Optional[str], migrations_dir: Optional[str], backup: bool,
               require_approval: Optional[bool], database_url_env: Optional[str] = None
               ) -> tuple[Settings, Target, bool]:
    """Return the settings, the target and whether an approval is needed (the live-target policy)."""
    settings = Settings(**({"migrations_dir": Path(migrations_dir)} if migrations_dir else {}))
    target = resolve_target(settings, env, database_url_env=database_url_env)
    get_run_logger().info("target %s (%s)", target.masked_url, target.env)
    return settings, target, policy.approval_needed(target.env, backup=backup,
                                                    require_approval=require_approval)


def _through_tunnel(stack: contextlib.ExitStack, settings: Settings, target: Target) -> Target:
    """Open the tunnel for the proxy environment (closed with ``stack``); return the target to use."""
    if target.env is not Env.PROXY:
        return target
    return stack.enter_context(tasks.open_tunnel(settings)).target_for(target)


def _rehearsed_plan(target: Target, settings: Settings, run_id: str, *, backup: bool,
                    dry_run: bool, allow_destructive: bool) -> tuple[DeployPlan, list]:
    """Check, plan and lint, back up, rehearse, publish the plan; return it and the models.

    Raises _RunEnds where the run ends before any approval: up to date, lint, rehearsal, dry run.
    """
    secret = target.password
    with _stage("connection check", secret):
        tasks.check_connection(target)
    with _stage("plan", secret):
        plan, lint_report = tasks.make_plan(target, settings, allow_destructive)
        models = load_models(settings.models)
    if plan.empty:
        raise _RunEnds(Completed(message="up to date"))
    if not lint_report.ok:
        create_markdown_artifact(lint_report.to_markdown(), key="migration-lint",
                                 description="Lint errors stopped the run")
        raise _RunEnds(_failed_at("lint", f"{lint_report.summary()}: {lint_report.errors[0].text()}"))
    backup_info = rehearsal = checked_before = None
    if backup:
        with _stage("configuration", secret):
            server = tasks.rehearsal_server(target, settings)  # never production's by default
        with _stage("preflight", secret):
            checked_before = tasks.preflight(target, settings, plan, "before the backup")
        with _stage("backup", secret):
            # the rehearsal's copy is made on that server while the backup uploads
            backup_info, copy = tasks.take_backup(target, settings, plan, server, run_id)
        with _stage("rehearsal", secret):
            rehearsal = tasks.rehearse(plan, target, settings, backup_info, models, run_id,
                                       allow_destructive, copy)
    deploy = DeployPlan(str(target.env), plan, lint_report, backup_info, rehearsal, checked_before)
    create_markdown_artifact(deploy.to_markdown(), key="migration-plan", description=deploy.headline())
    get_run_logger().info("plan:\n%s", deploy.text())
    if not deploy.ok:
        raise _RunEnds(_failed_at("rehearsal", "the rehearsal on a copy found errors (see the "
                                               "migration-plan artifact)"))
    if dry_run:
        raise _RunEnds(Completed(message=f"dry run: would apply {len(plan.migrations)}: "
                                         f"{', '.join(plan.names)}; nothing changed"))
    return deploy, models


def _approve(deploy: DeployPlan, models: list, target: Target, settings: Settings, *,
             approval_needed: bool, allow_destructive: bool, timeout: int,
             fleet_approval: Optional[FleetApproval] = None) -> _Approved:
    """Ask for the approval (where needed), make the plan again, snapshot the schema; return what may be applied.

    Raises _RunEnds on a refusal, or when the plan made again is not the one approved.
    """
    secret, plan, fingerprint = target.password, deploy.plan, deploy.fingerprint
    approval = ApprovalRecord(None, None, fingerprint)
    actor = settings.actor or None
    if fleet_approval is not None:  # the fleet's one approval: only for this very plan
        with _stage("fleet approval check", secret):
            actor = fleet_approval.check(plan) or actor
        approval = ApprovalRecord(actor, None, fingerprint)
    elif approval_needed:
        with _stage("approval", secret):
            decision = ask_approval(deploy.to_markdown(), headline=deploy.headline(),
                                    fingerprint=fingerprint, timeout=timeout,
                                    consequence="nothing changed")
        if not decision.approved:
            raise _RunEnds(Failed(message=f"{decision.refusal}, nothing changed"))
        actor = decision.approver
        approval = ApprovalRecord(decision.approver, decision.comment, fingerprint)
        with _stage("connection check after the approval", secret):
            tasks.check_connection(target)  # an hour may have passed; the tunnel too
    backup_key = deploy.backup.key if deploy.backup else None
    if approval_needed:  # the approval covers this plan only: make it again and compare
        with _stage("plan check before the apply", secret):
            again, _ = tasks.make_plan(target, settings, allow_destructive)
        if again.empty:  # another run applied it while this one waited
            raise _RunEnds(Completed(message="up to date (another run applied these meanwhile)"))
        if plan_fingerprint(again, backup_key) != fingerprint:
            raise _RunEnds(Failed(message=f"plan changed since it was approved, nothing changed: "
                                          f"{plan_changes(plan, again)}; run again and approve the "
                                          "new plan"))
    with _stage("preflight", secret):
        tasks.preflight(target, settings, plan, "before the apply", deploy.rehearsal)
    with _stage("snapshot", secret):
        before = tasks.snapshot(target)
        drift = tasks.drift_before(target, models)
    return _Approved(plan, models, backup_key, actor, before, drift, approval)


def _apply_and_check(approved: _Approved, target: Target, settings: Settings, run_id: str
                     ) -> tuple[list, Optional[str]]:
    """Apply the approved plan and post-check it; return (what was committed, the problem or None)."""
    try:
        report = tasks.apply(approved.plan, target, settings, approved.actor, run_id,
                             approved.approval)
    except PhaseFailed as exc:  # the batch is committed and valid: no rollback, a rerun continues
        raise _RunEnds(Failed(message=f"applied; stopped in phase {exc.phase}, after the batch's commit: "
                                      f"{exc}")) from exc
    except MigrationFailed as exc:
        if not exc.committed and not isinstance(exc, NonAtomicFailed):
            raise _RunEnds(_failed_at("apply", exc)) from exc  # the batch was rolled back
        return list(exc.committed), f"apply: {exc}"
    except DbcoreError as exc:  # the lock, a changed plan: refused before any change
        raise _RunEnds(_failed_at("apply", exc)) from exc
    if not report.names:  # another run applied them while this one waited
        raise _RunEnds(Completed(message=report.note or "up to date"))
    try:
        checked = tasks.post_checks(target, approved.models, approved.drift_before)
    except DbcoreError as exc:
        return report.names, f"post-checks: {exc}"
    if not checked.ok:
        create_markdown_artifact(checked.to_markdown(), key="migration-post-checks",
                                 description="Post-checks failed after the apply")
        return report.names, f"post-checks: {checked.text()}"
    return report.names, None


def _change(approved: _Approved, target: Target, settings: Settings, run_id: str,
            approval_needed: bool, timeout: int) -> State:
    """The part that may change the database: apply, post-checks, the rollback subflow if they fail."""
    may_have_changed = "the database may have changed: check `dbmigrate status`"
    try:
        applied, problem = _apply_and_check(approved, target, settings, run_id)
    except _RunEnds:
        raise
    except Exception as exc:
        return _unexpected("apply", exc, target.password, may_have_changed)
    if problem is None:
        return Completed(message=f"applied {len(applied)}: {', '.join(applied)}")
    if not applied:
        return Failed(message=f"failed at {problem}")
    try:
        how = rollback_after_failed_apply(
            target=target, settings=settings, names=applied, before=approved.schema_before,
            backup_key=approved.backup_key, require_approval=approval_needed,
            approval_timeout=timeout, run_id=run_id)
    except DbcoreError as exc:
        return Failed(message=f"failed after apply and the rollback failed too: {exc}")
    except Exception as exc:
        return _unexpected("rollback", exc, target.password, may_have_changed)
    return Failed(message=f"failed after apply at {problem}; rolled back by {how}")


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
):
    """Apply every pending migration; return a Completed or Failed state whose message says what happened."""
    tasks.show_dbcore_logs()
    run_id = str(get_run_context().flow_run.id)
    try:
        with _stage("configuration"):
            settings, target, approval_needed = _configure(env, migrations_dir, backup,
                                                           require_approval, database_url_env)
        with contextlib.ExitStack() as held:
            if policy.is_live(target.env):  # locally, the migration lock keeps applies apart
                with _stage("waiting for another deploy"):
                    held.enter_context(one_deploy_at_a_time(target, approval_timeout_seconds + 3600))
            with _stage("tunnel"):
                target = _through_tunnel(held, settings, target)
            with _stage("plan", target.password):  # up to the apply, any end is "nothing changed"
                deploy, models = _rehearsed_plan(target, settings, run_id, backup=backup,
                                                 dry_run=dry_run, allow_destructive=allow_destructive)
                approved = _approve(deploy, models, target, settings, approval_needed=approval_needed,
                                    allow_destructive=allow_destructive,
                                    timeout=approval_timeout_seconds, fleet_approval=fleet_approval)
            # from here on the database may change
            return _change(approved, target, settings, run_id, approval_needed,
                           approval_timeout_seconds)
    except _RunEnds as ended:
        return ended.state


def _head_start(args: argparse.Namespace):
    """Begin the backup and the rehearsal's copy while Prefect starts its API (None where it cannot).

    Prefect's temporary API takes seconds to start; the backup need not wait for it. Local targets
    only: a live one is backed up only once the run holds its deploy slot, so that a backup never
    overlaps another run's apply. The flow's backup task takes it over for the same plan, else it
    is dropped (dbcore/deploy/head_start.py).
    """
    if not args.backup:
        return None
    try:
        overrides = {"migrations_dir": Path(args.migrations_dir)} if args.migrations_dir else {}
        settings = Settings(**overrides)
        target = resolve_target(settings, args.env)
    except (ValidationError, DbcoreError):
        return None  # the flow says what is wrong, in its own words
    if target.env is not Env.LOCAL:
        return None
    try:
        server = tasks.rehearsal_server(target, settings)
    except DbcoreError:
        return None  # the flow says what is wrong, in its own words
    head = head_start.begin(target, settings, server, allow_destructive=args.allow_destructive)
    tasks.HEAD_STARTS.append(head)
    return head


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
    parser.add_argument("--migrations-dir", help="default: ./migrations")
    args = parser.parse_args(argv)
    head = _head_start(args)
    try:
        state = migrate(env=args.env, dry_run=args.dry_run, require_approval=args.require_approval,
                        backup=args.backup, allow_destructive=args.allow_destructive,
                        migrations_dir=args.migrations_dir, return_state=True)
    finally:
        if head is not None:
            head.discard()
    print(f"migrate: {state.message or state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
