"""The rollback subflow: undo an apply whose post-checks failed.

First the migrations' own rollback() functions, newest first, in one transaction, verified
against the schema snapshot taken before the apply. If that fails, the backup taken before the
apply is restored in place (with a second approval where the run needed one).

A subflow's parameters are stored by the Prefect API, so the database (whose URL holds a
password) is never one of them: the calling flow hands it over in-process, keyed by run id.
"""

from typing import Optional

from prefect import flow, get_run_logger, pause_flow_run, task
from prefect.cache_policies import NO_CACHE

from dbcore import recovery, runner
from dbcore.connection import Target
from dbcore.errors import DbcoreError
from dbcore.settings import Settings
from flows.approval import approval_form

_HANDOVER: dict[str, tuple[Target, Settings]] = {}


class RollbackFailed(DbcoreError):
    """Neither the rollback functions nor the backup could bring the database back."""


@task(name="rollback-functions", cache_policy=NO_CACHE)
def run_rollback_functions(target: Target, settings: Settings, names: list, run_id: str) -> list:
    """Run the rollback() of ``names`` (newest first) in one transaction; return what was undone."""
    plan = runner.plan_rollback(target, settings, names=list(names))
    return runner.rollback_plan(plan, target, settings, actor="rollback-subflow", run_id=run_id).names


@task(name="verify-schema", cache_policy=NO_CACHE)
def schema_differences(target: Target, before: str) -> list:
    """Return how the schema now differs from the snapshot taken before the apply (empty: same)."""
    return recovery.snapshot_diff(before, recovery.schema_snapshot(target))


@task(name="restore-backup", cache_policy=NO_CACHE)
def restore(target: Target, settings: Settings, backup_key: str, run_id: str) -> dict:
    """Restore the pre-apply backup over the database; return what was done."""
    return recovery.restore_in_place(backup_key, target, settings, run_id=run_id).to_dict()


@flow(name="rollback-migrations", log_prints=False)
def rollback_migrations(names: list, backup_key: Optional[str], before: str,
                        require_approval: bool, run_id: str) -> str:
    """Bring the database back to its state before the apply; return how (raises RollbackFailed)."""
    logger = get_run_logger()
    target, settings = _HANDOVER[run_id]
    try:
        undone = run_rollback_functions(target, settings, names, run_id)
        diff = schema_differences(target, before)
        if not diff:
            return f"rollback functions ({', '.join(undone)})"
        logger.error("after the rollback functions the schema differs from before the apply:\n%s",
                     "\n".join(diff))
    except DbcoreError as exc:
        logger.error("rollback functions failed: %s", exc)
    if not backup_key:
        raise RollbackFailed(
            "the rollback functions did not restore the schema and there is no backup: restore "
            "the database by hand (`dbmigrate restore KEY --into ...`)")
    if require_approval:
        answer = pause_flow_run(
            wait_for_input=approval_form(
                f"# Restore the backup?\n\nThe rollback functions did not bring `{target.dbname}` "
                f"back. Approving replaces the database with backup `{backup_key}`; the current "
                "one is kept under another name."),
            timeout=3600, poll_interval=2)
        if not answer.approve:
            raise RollbackFailed(f"restore of {backup_key} rejected: the database is left as the "
                                 "failed apply left it; restore it by hand")
    done = restore(target, settings, backup_key, run_id)
    return f"restoring backup {backup_key} (the failed database is kept as {done['kept_as']})"


def rollback_after_failed_apply(*, target: Target, settings: Settings, names: list, before: str,
                                backup_key: Optional[str], require_approval: bool, run_id: str) -> str:
    """Run the rollback subflow for ``target`` without passing its URL through the Prefect API."""
    _HANDOVER[run_id] = (target, settings)
    try:
        return rollback_migrations(names=names, backup_key=backup_key, before=before,
                                   require_approval=require_approval, run_id=run_id)
    finally:
        _HANDOVER.pop(run_id, None)
