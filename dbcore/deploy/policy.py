"""The live-target policy: a production or proxy database changes only as one rule says, for every verb.

One place says it, so that the flow and every ``dbmigrate`` verb that changes a live database
(``apply``, ``rollback``, ``baseline``, ``restore``) cannot disagree:

- a named actor (``--actor``; in the flow, the approver): who takes responsibility, recorded in
  ``migration_audit``;
- something to go back to, taken first: a fresh backup, verified (downloaded, its sha256
  checked, read by pg_restore) before anything changes (``apply``, ``rollback``); for a
  ``restore`` over a live database, the live database itself, kept renamed beside the restored
  one; ``baseline`` changes only the bookkeeping, and instead checks that the tables the marked
  files create exist;
- a record that survives the change: the audit row is written in the database as it is after
  the change (a restore's row in the restored database), and a restore is also recorded in the
  stored backup's own metadata.

Locally all of it is optional (the flow backs up by default; ``--approve`` asks anyway).
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable
from urllib.parse import quote

from dbcore.backup.dump import S3_ERRORS, BackupInfo, BytesProgress, backup_to_s3
from dbcore.backup.restore import RestoreReport, inspect_target, restore_backup, verify_backup
from dbcore.backup.storage import head, open_storage, replace_metadata
from dbcore.connection import Env, Target, connect, raw_session
from dbcore.deploy.recovery import restore_in_place
from dbcore.deploy.touched import tables_created_by_files
from dbcore.errors import LivePolicyRefused
from dbcore.migrate.baseline import BaselineReport, baseline
from dbcore.migrate.files import discover
from dbcore.migrate.history import ApprovalRecord, allow_baseline_rows, ensure_audit_table, record_audit
from dbcore.migrate.plan import Plan, RunReport, pending_files
from dbcore.migrate.plan import Progress as RunProgress
from dbcore.migrate.runner import execute
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)


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


def require_actor(env: Env, actor: str | None, doing: str = "applying to") -> None:
    """Refuse a change of a live database that does not name who takes it (``doing`` says what).

    At a terminal the person who types the command approves what it prints; naming themselves
    (recorded in migration_audit) is the approval. Raises LivePolicyRefused.
    """
    if is_live(env) and not (actor or "").strip():
        what = "the plan printed" if doing in ("applying to", "rolling back") else "what it does"
        raise LivePolicyRefused(
            f"{doing} the {env} database needs an approval: pass --actor YOUR_NAME (you approve "
            f"{what}, recorded in migration_audit), or run the flow and approve in Prefect")


def require_named_approver(env: Env, approver: str | None) -> None:
    """Refuse a terminal apply on a live target that does not name who approves it (LivePolicyRefused)."""
    require_actor(env, approver, "applying to")


def verified_backup(target: Target, settings: Settings) -> BackupInfo:
    """Back ``target`` up and verify the stored object (sha256, pg_restore reads it); return it.

    Raises BackupFailed / BackupCorrupt / StorageError: then nothing may change.
    """
    info = backup_to_s3(target, settings)
    verify_backup(info.key, settings)
    return info


def apply_guarded(plan: Plan, target: Target, settings: Settings, *, actor: str | None,
                  run_id: str | None = None, dry_run: bool = False, progress: RunProgress | None = None,
                  backed_up: Callable[[BackupInfo], None] | None = None,
                  run: Callable[..., RunReport] = execute) -> RunReport:
    """Apply or roll back ``plan`` with ``run`` (the runner's execute, or a retrying one) as the policy says.

    On a live target the actor must be named and a verified backup is taken right before the
    change (``backed_up`` is told where it went); a failed backup stops before any change.
    A dry run changes nothing and needs neither.
    """
    if is_live(target.env) and not plan.empty and not dry_run:
        doing = "applying to" if plan.action == "apply" else "rolling back"
        require_actor(target.env, actor, doing)
        info = verified_backup(target, settings)
        if backed_up:
            backed_up(info)
    return run(plan, target, settings, actor=actor, run_id=run_id, dry_run=dry_run,
               progress=progress)


def baseline_guarded(target: Target, settings: Settings, upto: str, *, actor: str | None,
                     run_id: str | None = None) -> BaselineReport:
    """Baseline as the policy says: on a live target, the actor named and the marked files' tables there.

    A baseline records migrations as applied without running them: on a live database that
    lacks what they create, history would claim tables that do not exist. Raises LivePolicyRefused.
    """
    if is_live(target.env):
        require_actor(target.env, actor, "a baseline of")
        chosen = pending_files(discover(settings.migrations_dir), [], upto)
        missing = sorted(tables_created_by_files([f.path for f in chosen]) - _existing_tables(target))
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise LivePolicyRefused(
                f"refusing to baseline the {target.env} database {target.dbname} at "
                f"{chosen[-1].name}: the marked files create {shown}, which the database does not "
                "have: baseline at the migration the database really has, or apply the missing ones")
    return baseline(target, settings, upto, actor=actor, run_id=run_id)


def _existing_tables(target: Target) -> set[str]:
    with raw_session(target, "dbmigrate-baseline") as conn, conn.cursor() as cur:
        cur.execute("SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                    "WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') "
                    "AND n.nspname = ANY (current_schemas(false))")
        return {row[0] for row in cur.fetchall()}


@dataclass(frozen=True)
class GuardedRestore:
    """A restore as the policy ran it: the report, and where the replaced database went (if kept)."""

    report: RestoreReport
    kept_as: str | None  # the live database, renamed, when one was replaced
    run_id: str


def restore_guarded(key: str, into: Target, settings: Settings, *, actor: str | None,
                    force: bool = False, allow_production: bool = False, jobs: int | None = None,
                    progress: BytesProgress | None = None, run_id: str | None = None) -> GuardedRestore:
    """Restore ``key`` into ``into`` as the policy says; return what happened.

    Locally: a plain restore (``force`` overwrites a database that is not empty). On a live
    target: ``allow_production`` and a named actor; a database that is not empty is never
    overwritten in place but replaced by a fresh restore and kept renamed (``force`` still
    says that replacing it is meant); the restore is recorded afterwards in the restored
    database's migration_audit and in the backup object's metadata.
    Raises RestoreRefused / LivePolicyRefused before anything changes.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    if not is_live(into.env):
        report = restore_backup(key, into, settings, force=force, allow_production=allow_production,
                                jobs=jobs, progress=progress)
        return GuardedRestore(report, None, run_id)
    require_actor(into.env, actor, "a restore into")
    state = inspect_target(into)
    if not state.relations:  # nothing to lose: a plain restore, then its record
        report = restore_backup(key, into, settings, force=force, allow_production=allow_production,
                                jobs=jobs, progress=progress)
        kept = None
    else:
        # restore_backup's own refusals first (allow_production, --force on a non-empty one)
        if not allow_production or not force:
            restore_backup(key, into, settings, force=force, allow_production=allow_production)
        replaced = restore_in_place(key, into, settings, run_id=run_id, progress=progress,
                                    kept_infix="_before_restore_")
        kept = replaced.kept_as
        report = RestoreReport(key=key, database=into.dbname, size=0, jobs=jobs or 0,
                               created_database=False, forced=True, seconds=replaced.seconds)
    _record_restore(key, into, settings, actor=actor or "", run_id=run_id, kept=kept)
    return GuardedRestore(report, kept, run_id)


def _record_restore(key: str, into: Target, settings: Settings, *, actor: str, run_id: str,
                    kept: str | None) -> None:
    """Write the restore's audit row in the restored database, and note it in the backup's metadata."""
    comment = f"restored {key}" + (f"; the replaced database is kept as {kept}" if kept else "")
    db = connect(into, "dbmigrate-restore")
    try:
        with db.atomic():
            ensure_audit_table(db)
            allow_baseline_rows(db)
            record_audit(db, name=key, action="restore", checksum=None, actor=actor, run_id=run_id,
                         duration_ms=None, approval=ApprovalRecord(actor, comment, ""))
    finally:
        db.close()
    storage = open_storage(settings)
    try:
        meta = head(storage, key)
        metadata = dict(meta.get("Metadata") or {})
        metadata.update({
            "restored-into": quote(f"{into.env}/{into.dbname}", safe="/"),
            "restored-at": quote(datetime.now(timezone.utc).isoformat(), safe=""),
            "restored-by": quote(actor, safe=""),
            "restored-run": quote(run_id, safe=""),
        })
        if kept:
            metadata["restored-kept-as"] = quote(kept, safe="")
        replace_metadata(storage, key, metadata, meta.get("ContentType") or "application/octet-stream")
    except S3_ERRORS as exc:  # the audit row is the record; this is a second copy
        log.warning("restore of %s not noted in its metadata: %s", key, error_line(exc))
