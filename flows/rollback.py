"""The rollback subflow: undo an apply whose post-checks failed.

First the migrations' own rollback() functions, newest first, one transaction per phase, verified
against the schema snapshot taken before the apply. If that fails, the backup taken before the
apply is restored in place (with a second approval where the run needed one).

A subflow's parameters are stored by the Prefect API, so neither the database (whose URL holds
a password) nor the schema snapshot (large, and it may hold connection strings) is one of them:
the calling flow hands the run and the approved change over in-process (a context variable of
the thread the subflow runs in), never through the API.
"""

import hashlib
from contextvars import ContextVar
from typing import Optional

from prefect import flow, get_run_logger
from prefect.cache_policies import NO_CACHE

from dbcore.connection import Target
from dbcore.deploy import recovery
from dbcore.deploy.run import DeployRun
from dbcore.deploy.steps import ApprovedChange
from dbcore.errors import DbcoreError, RollbackFailed, RollbackRefused
from dbcore.migrate import isolated
from dbcore.migrate import plan as planning
from dbcore.settings import Settings
from flows.approval import ask_approval
from flows.scrub import task

#: the run and its approved change, handed to the subflow started in the same thread
_HANDED: ContextVar[Optional[tuple[DeployRun, ApprovedChange]]] = ContextVar("dbmigrate_rollback", default=None)


@task(name="rollback-functions", cache_policy=NO_CACHE)
def run_rollback_functions(target: Target, settings: Settings, names: list, run_id: str) -> list:
    """Run the rollback() of ``names`` (newest first), one transaction per phase; return what was undone."""
    plan = planning.plan_rollback(target, settings, names=list(names))
    return isolated.execute_isolated(plan, target, settings, actor="rollback-subflow",
                                     run_id=run_id).names  # in a child: an exit is a failure


@task(name="verify-schema", cache_policy=NO_CACHE)
def schema_differences(target: Target, before: str) -> list:
    """Return how the schema now differs from the snapshot taken before the apply (empty: same)."""
    return recovery.snapshot_diff(before, recovery.schema_snapshot(target))


@task(name="restore-backup", cache_policy=NO_CACHE)
def restore(target: Target, settings: Settings, backup_key: str, run_id: str) -> dict:
    """Restore the pre-apply backup over the database; return what was done."""
    return recovery.restore_in_place(backup_key, target, settings, run_id=run_id).to_dict()


def _restore_approved(target: Target, backup_key: str, timeout: int) -> None:
    """Pause for a second approval of the restore; raise RollbackFailed unless approved."""
    left = "the database is left as the failed apply left it: restore it by hand"
    decision = ask_approval(
        f"# Restore the backup?\n\nThe rollback functions did not bring `{target.dbname}` back. "
        f"Approving replaces the database with backup `{backup_key}`. **Writes made since that "
        "backup was taken will then exist only in the old database**, which is kept under another "
        "name.", headline=f"restore backup {backup_key} over {target.dbname}",
        target=f"{target.masked_url} ({target.env.value})",
        fingerprint=hashlib.sha256(backup_key.encode()).hexdigest()[:16], timeout=timeout,
        consequence=left)
    if not decision.approved:
        raise RollbackFailed(f"the restore of {backup_key} was not approved: {decision.refusal}: {left}")


@flow(name="rollback-migrations", log_prints=False)
def rollback_migrations(names: list, backup_key: Optional[str], schema_sha256: str,
                        require_approval: bool, approval_timeout: int, run_id: str) -> str:
    """Bring the database back to its state before the apply; return how (raises RollbackFailed)."""
    logger = get_run_logger()
    handed = _HANDED.get()
    if handed is None:
        raise RollbackFailed("the rollback subflow runs only from the migrate flow, which hands it the database")
    run, approved = handed
    target, settings, before = run.target, run.settings, approved.schema_before
    try:
        undone = run_rollback_functions(target, settings, names, run_id)
        diff = schema_differences(target, before)
        if not diff:
            return f"rollback functions ({', '.join(undone)})"
        logger.error("after the rollback functions the schema differs from before the apply:\n%s",
                     "\n".join(diff))
    except RollbackRefused as exc:  # nothing ran: a rollback() that undoes nothing
        logger.error("%s: going straight to the restore of the backup", exc)
    except DbcoreError as exc:
        logger.error("rollback functions failed: %s", exc)
    if not backup_key:
        raise RollbackFailed(
            "the rollback functions did not restore the schema and there is no backup: restore "
            "the database by hand (`dbmigrate restore KEY --into ...`)")
    if require_approval:
        _restore_approved(target, backup_key, approval_timeout)
    done = restore(target, settings, backup_key, run_id)
    return (f"restoring backup {backup_key} (the failed database, with any writes made since "
            f"the backup, is kept as {done['kept_as']})")


def rollback_after_failed_apply(run: DeployRun, names: list, approved: ApprovedChange) -> str:
    """Run the rollback subflow for ``run``, handing over what must not go through the API."""
    token = _HANDED.set((run, approved))
    try:
        return rollback_migrations(
            names=names, backup_key=approved.backup_key,
            schema_sha256=hashlib.sha256(approved.schema_before.encode()).hexdigest(),
            require_approval=run.approval_needed, approval_timeout=run.options.approval_timeout,
            run_id=run.run_id)
    finally:
        _HANDED.reset(token)
