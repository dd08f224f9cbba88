"""The `migrate` flow: pending migrations to a database, safely.

resolve target -> tunnel (proxy) -> check connection -> plan + lint -> backup -> rehearsal on a
copy -> plan artifact -> [dry run stops] -> approval pause -> apply (one transaction, lock) ->
post-checks -> on failure the rollback subflow -> tunnel closed in every case.

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

from prefect import flow, get_run_logger, pause_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.client.orchestration import get_client
from prefect.context import get_run_context
from prefect.exceptions import FlowPauseTimeout
from prefect.states import Completed, Failed
from pydantic import ValidationError

from dbcore.checks import load_models
from dbcore.connection import Env, resolve_target
from dbcore.errors import DbcoreError, MigrationFailed
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


@flow(name="migrate", log_prints=False, validate_parameters=True)
def migrate(
    env: Optional[EnvName] = None,
    dry_run: bool = False,
    require_approval: Optional[bool] = None,
    approval_timeout_seconds: int = 3600,
    backup: bool = True,
    allow_destructive: bool = False,
    migrations_dir: Optional[str] = None,
):
    """Apply every pending migration; return a Completed or Failed state whose message says what happened."""
    logger = get_run_logger()
    run_id = str(get_run_context().flow_run.id)
    overrides = {"migrations_dir": Path(migrations_dir)} if migrations_dir else {}
    try:
        settings = Settings(**overrides)
        target = resolve_target(settings, env)
    except ValidationError as exc:
        return Failed(message=f"failed at configuration, nothing changed: {describe_invalid(exc)}")
    except DbcoreError as exc:
        return Failed(message=f"failed at configuration, nothing changed: {exc}")
    approval_needed = require_approval if require_approval is not None else target.env is not Env.LOCAL
    if target.env is not Env.LOCAL and not backup:
        return Failed(message=f"failed at configuration, nothing changed: {target.env} needs a "
                              "backup before any migration: run without backup=False")
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
                return Failed(message=f"failed at lint, nothing changed: {lint_report.summary()}: "
                                      f"{lint_report.errors[0].text()}")
            models = load_models(settings.models)
            backup_info = rehearsal = None
            if backup:
                stage = "backup"
                backup_info = tasks.take_backup(target, settings)
                stage = "rehearsal"
                rehearsal = tasks.rehearse(plan, target, settings, backup_info.key, models, run_id)
            deploy = tasks.deploy_plan(str(target.env), plan, lint_report, backup_info, rehearsal)
            create_markdown_artifact(deploy.to_markdown(), key="migration-plan",
                                     description=deploy.headline())
            logger.info("plan:\n%s", deploy.text())
            if not deploy.ok:
                return Failed(message="failed at rehearsal, nothing changed: the rehearsal on a "
                                      "copy did not pass its post-checks (see the plan artifact)")
            if dry_run:
                return Completed(message=f"dry run: would apply {len(plan.migrations)}: "
                                         f"{', '.join(plan.names)}; nothing changed")
            actor = settings.actor or None
            if approval_needed:
                stage = "approval"
                answer = pause_flow_run(wait_for_input=approval_form(deploy.to_markdown()),
                                        timeout=approval_timeout_seconds, poll_interval=2)
                if not answer.approve:
                    who = f" by {answer.approver}" if answer.approver else ""
                    why = f": {answer.comment}" if answer.comment else ""
                    return Failed(message=f"rejected{who}{why}, nothing changed")
                actor = answer.approver
                logger.info("approved by %s%s", answer.approver,
                            f": {answer.comment}" if answer.comment else "")
            stage = "snapshot"
            before = tasks.snapshot(target)
            stage = "apply"
            try:
                report = tasks.apply(plan, target, settings, actor, run_id)
                applied, problem = report.names, None
                checked = tasks.post_checks(target, models)
                if not checked.ok:
                    create_markdown_artifact(checked.to_markdown(), key="migration-post-checks",
                                             description="Post-checks failed after the apply")
                    problem = f"post-checks: {checked.text()}"
            except MigrationFailed as exc:
                if not exc.committed:
                    raise  # the batch was rolled back: nothing changed
                applied, problem = list(exc.committed), f"apply: {exc}"
            except DbcoreError as exc:
                applied = plan.names
                problem = f"post-checks: {exc}"
            if problem is None:
                if not applied:  # another run applied them while this one waited
                    return Completed(message=report.note or "up to date")
                return Completed(message=f"applied {len(applied)}: {', '.join(applied)}")
            stage = "rollback"
            how = rollback_after_failed_apply(
                target=target, settings=settings, names=applied, before=before,
                backup_key=backup_info.key if backup_info else None,
                require_approval=approval_needed, run_id=run_id)
            return Failed(message=f"failed after apply at {problem}; rolled back by {how}")
    except FlowPauseTimeout:
        # Prefect has already failed the run with its own words; put ours in their place.
        message = f"rejected (no answer within {approval_timeout_seconds}s), nothing changed"
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Failed(message=message), force=True)
        return Failed(message=message)
    except DbcoreError as exc:
        if stage == "rollback":
            return Failed(message=f"failed after apply and the rollback failed too: {exc}")
        return Failed(message=f"failed at {stage}, nothing changed: {exc}")


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
    state = migrate(env=args.env, dry_run=args.dry_run, require_approval=args.require_approval,
                    backup=args.backup, allow_destructive=args.allow_destructive,
                    migrations_dir=args.migrations_dir, return_state=True)
    print(f"migrate: {state.message or state.name}")
    return 0 if state.is_completed() else 1


if __name__ == "__main__":
    sys.exit(main())
