"""The live-target policy: a production or proxy database changes only after a backup and an approval.

One place says it, so that the flow and ``dbmigrate apply`` cannot disagree. Locally both are
optional (the flow backs up by default; ``--approve`` asks for an approval anyway).
"""

from __future__ import annotations

from typing import Callable

from dbcore.backup.dump import BackupInfo, backup_to_s3
from dbcore.connection import Env, Target
from dbcore.errors import LivePolicyRefused
from dbcore.migrate.plan import Plan, Progress, RunReport
from dbcore.migrate.runner import execute
from dbcore.settings import Settings


def is_live(env: Env) -> bool:
    """Return True for the environments whose database serves the application (production, proxy)."""
    return env is not Env.LOCAL


def approval_needed(env: Env, *, backup: bool, require_approval: bool | None) -> bool:
    """Return whether the change must wait for a person's approval.

    Raises LivePolicyRefused when a live target is asked to go without its backup or approval.
    """
    if is_live(env) and not backup:
        raise LivePolicyRefused(f"{env} needs a backup before any migration: do not switch the "
                                "backup off")
    if is_live(env) and require_approval is False:
        raise LivePolicyRefused(f"{env} always needs an approval: do not switch the approval off")
    return is_live(env) or bool(require_approval)


def require_named_approver(env: Env, approver: str | None) -> None:
    """Refuse a terminal apply on a live target that does not name who approves it.

    At a terminal the person who types the command approves the plan it prints; naming
    themselves (recorded in migration_audit) is the approval. Raises LivePolicyRefused.
    """
    if is_live(env) and not (approver or "").strip():
        raise LivePolicyRefused(
            f"applying to the {env} database needs an approval: pass --actor YOUR_NAME (you approve "
            "the plan printed, recorded in migration_audit), or run the flow and approve in Prefect")


def apply_guarded(plan: Plan, target: Target, settings: Settings, *, actor: str | None,
                  run_id: str | None = None, dry_run: bool = False, progress: Progress | None = None,
                  backed_up: Callable[[BackupInfo], None] | None = None,
                  run: Callable[..., RunReport] = execute) -> RunReport:
    """Apply ``plan`` with ``run`` (the runner's execute, or a retrying one) as the policy says; return its report.

    On a live target the actor must be named (the approval) and a backup is taken right before
    the apply (``backed_up`` is told where it went); a failed backup stops before any change.
    A dry run changes nothing and needs neither.
    """
    if is_live(target.env) and not plan.empty and not dry_run:
        require_named_approver(target.env, actor)
        info = backup_to_s3(target, settings)
        if backed_up:
            backed_up(info)
    return run(plan, target, settings, actor=actor, run_id=run_id, dry_run=dry_run,
               progress=progress)
