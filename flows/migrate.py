"""The `migrate` flow: pending migrations to a database, safely.

resolve target -> tunnel (proxy) -> check connection -> plan + lint -> preflight -> backup (the
rehearsal's copy made meanwhile) -> rehearsal on the copy -> plan artifact -> [dry run stops] ->
approval pause -> preflight again -> apply (one transaction, lock) -> post-checks -> on failure
the rollback subflow -> tunnel closed in every case.

Run it: ``python flows/migrate.py --env local`` (or ``--env proxy --dry-run``); deployed as
``migrate/migrate-production``. No ``from __future__ import annotations`` here: Prefect reads
the parameter annotations at run time (FIELD_NOTES).
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Literal, Optional

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# dbcore's own log lines (backup, apply) shown in the run's logs; read when Prefect is imported
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dbcore")
if __name__ == "__main__":  # a terminal run: the local Prefect API of `make run`, if it is up
    from flows.local_api import use_local_api

    use_local_api()

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.states import Completed, Failed
from pydantic import ValidationError

from dbcore.checks.post import load_models
from dbcore.connection import Env, resolve_target
from dbcore.deploy import head_start
from dbcore.deploy.fleet import FleetApproval
from dbcore.errors import DbcoreError, MigrationFailed, NonAtomicFailed
from dbcore.redact import error_line
from dbcore.settings import Settings, describe_invalid
from flows import tasks
from flows.approval import approval_form
from flows.rollback import rollback_after_failed_apply

EnvName = Literal["local", "proxy", "production"]


def _tunnel(settings: Settings, env: Env):
    """Open the tunnel for the proxy environment (closed on leaving); a no-op context elsewhere."""
    if env is not Env.PROXY:
        return contextlib.nullcontext()
    return tasks.open_tunnel(settings)


def _run_name() -> str:
    """Name runs after their environment, so the runs list reads as a deploy log."""
    env = get_run_context().flow_run.parameters.get("env") or "auto"
    return f"migrate-{env}"


def _rejected(message: str) -> Failed:
    return Failed(message=f"{message}, nothing changed")


def _failed_at(stage: str, detail: object) -> Failed:
    return Failed(message=f"failed at {stage}, nothing changed: {detail}")


def _ask_approval(plan_markdown: str, timeout: int, run_id: str):
    """Pause for the approver; return (actor, None) if approved, else (None, the final Failed state)."""
    try:
        answer = pause_flow_run(wait_for_input=approval_form(plan_markdown), timeout=timeout,
                                poll_interval=2)
    except FlowPauseTimeout:
        # Prefect has already failed the run with its own words; put ours in their place.
        message = f"rejected (no answer within {timeout}s), nothing changed"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Failed(message=message), force=True)
        return None, Failed(message=message)
    except ValidationError:
        # The form's schema cannot say "a name when approving"; the model does, at load.
        return None, _rejected("rejected (an approval must give the approver's name)")
    if not answer.approve:
        who = f" by {answer.approver}" if answer.approver else ""
        why = f": {answer.comment}" if answer.comment else ""
        return None, _rejected(f"rejected{who}{why}")
    get_run_logger().info("approved by %s%s", answer.approver,
                          f": {answer.comment}" if answer.comment else "")
    return answer.approver, None


@flow(name="migrate", flow_run_name=_run_name, log_prints=False, validate_parameters=True)
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
    logger = get_run_logger()
    run_id = str(get_run_context().flow_run.id)
    overrides = {"migrations_dir": Path(migrations_dir)} if migrations_dir else {}
    try:
        settings = Settings(**overrides)
        target = resolve_target(settings, env, database_url_env=database_url_env)
    except ValidationError as exc:
        return _failed_at("configuration", describe_invalid(exc))
    except DbcoreError as exc:
        return _failed_at("configuration", exc)
    live = target.env is not Env.LOCAL
    if live and not backup:
        return _failed_at("configuration", f"{target.env} needs a backup before any migration: "
                                           "run without backup=False")
    if live and require_approval is False:
        return _failed_at("configuration", f"{target.env} always needs an approval: run "
                                           "without require_approval=False")
    approval_needed = live or bool(require_approval)
    logger.info("target %s (%s)", target.masked_url, target.env)
    stage = "tunnel"
    try:
        with _tunnel(settings, target.env) as tunnel:
            if tunnel is not None:
                target = tunnel.target_for(target)
            stage = "connection check"
            tasks.check_connection(target)
            stage = "plan"
            plan, lint_report = tasks.make_plan(target, settings, allow_destructive)
            if plan.empty:
                return Completed(message="up to date")
            if not lint_report.ok:
                create_markdown_artifact(lint_report.to_markdown(), key="migration-lint",
                                         description="Lint errors stopped the run")
                return _failed_at("lint", f"{lint_report.summary()}: "
                                          f"{lint_report.errors[0].text()}")
            models = load_models(settings.models)
            backup_info = rehearsal = checked_before = None
            if backup:
                stage = "configuration"
                server = tasks.rehearsal_server(target, settings)  # never production's by default
                stage = "preflight"
                checked_before = tasks.preflight(target, settings, plan, "before the backup")
                stage = "backup"
                # the rehearsal's copy is made on that server while the backup uploads
                backup_info, copy = tasks.take_backup(target, settings, plan, server, run_id)
                stage = "rehearsal"
                rehearsal = tasks.rehearse(plan, target, settings, backup_info, models, run_id,
                                           allow_destructive, copy)
            deploy = tasks.deploy_plan(str(target.env), plan, lint_report, backup_info, rehearsal,
                                       checked_before)
            create_markdown_artifact(deploy.to_markdown(), key="migration-plan",
                                     description=deploy.headline())
            logger.info("plan:\n%s", deploy.text())
            if not deploy.ok:
                return _failed_at("rehearsal", "the rehearsal on a copy found errors (see the "
                                               "migration-plan artifact)")
            if dry_run:
                return Completed(message=f"dry run: would apply {len(plan.migrations)}: "
                                         f"{', '.join(plan.names)}; nothing changed")
            actor = settings.actor or None
            if fleet_approval is not None:  # the fleet's one approval: only for this very plan
                stage = "fleet approval check"
                actor = fleet_approval.check(plan) or actor
            elif approval_needed:
                stage = "approval"
                actor, refusal = _ask_approval(deploy.to_markdown(), approval_timeout_seconds,
                                               run_id)
                if refusal is not None:
                    return refusal
                stage = "connection check after the approval"
                tasks.check_connection(target)  # an hour may have passed; the tunnel too
            stage = "preflight"
            tasks.preflight(target, settings, plan, "before the apply", rehearsal)
            stage = "snapshot"
            before = tasks.snapshot(target)
            drift = tasks.drift_before(target, models)
            stage = "apply"
            try:
                report = tasks.apply(plan, target, settings, actor, run_id)
            except MigrationFailed as exc:
                if not exc.committed and not isinstance(exc, NonAtomicFailed):
                    raise  # the batch was rolled back: nothing changed
                applied, problem = list(exc.committed), f"apply: {exc}"
            else:
                applied, problem = report.names, None
                if not applied:  # another run applied them while this one waited
                    return Completed(message=report.note or "up to date")
                stage = "post-checks"
                try:
                    checked = tasks.post_checks(target, models, drift)
                    if not checked.ok:
                        create_markdown_artifact(checked.to_markdown(), key="migration-post-checks",
                                                 description="Post-checks failed after the apply")
                        problem = f"post-checks: {checked.text()}"
                except DbcoreError as exc:
                    problem = f"post-checks: {exc}"
            if problem is None:
                return Completed(message=f"applied {len(applied)}: {', '.join(applied)}")
            if not applied:
                return Failed(message=f"failed at {problem}")
            stage = "rollback"
            how = rollback_after_failed_apply(
                target=target, settings=settings, names=applied, before=before,
                backup_key=backup_info.key if backup_info else None,
                require_approval=approval_needed, approval_timeout=approval_timeout_seconds,
                run_id=run_id)
            return Failed(message=f"failed after apply at {problem}; rolled back by {how}")
    except DbcoreError as exc:
        if stage == "rollback":
            return Failed(message=f"failed after apply and the rollback failed too: {exc}")
        return _failed_at(stage, exc)
    except Exception as exc:  # a bug or an unexpected driver error: one line, and what we know
        state = ("the database may have changed: check `dbmigrate status`"
                 if stage in ("apply", "post-checks", "rollback") else "nothing changed")
        logger.exception("unexpected error at %s", stage)
        return Failed(message=f"failed at {stage} ({type(exc).__name__}: "
                              f"{error_line(exc, target.password)}); {state}")


def _head_start(args: argparse.Namespace):
    """Begin the backup and the rehearsal's copy while Prefect starts its API (None where it cannot).

    Prefect's temporary API takes seconds to start; the backup need not wait for it. Only where
    no tunnel is needed; the flow's backup task takes it over for the same plan, else it is
    dropped (dbcore/deploy/head_start.py).
    """
    if not args.backup:
        return None
    try:
        overrides = {"migrations_dir": Path(args.migrations_dir)} if args.migrations_dir else {}
        settings = Settings(**overrides)
        target = resolve_target(settings, args.env)
    except (ValidationError, DbcoreError):
        return None  # the flow says what is wrong, in its own words
    if target.env is Env.PROXY:
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
