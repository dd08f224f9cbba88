"""What the database says was applied: peewee-migrate's ``migratehistory`` and our ``migration_audit``.

peewee-migrate's history has no checksum, so every apply and rollback also writes an audit row
(name, sha256 of the file, when, who, run id; and for an approved plan the approver, their
comment and the plan's fingerprint). Reads never create tables: ``status`` on a production
database must not write.
"""

from __future__ import annotations

import datetime
import getpass
from dataclasses import dataclass

import peewee

HISTORY_TABLE = "migratehistory"
AUDIT_TABLE = "migration_audit"

_CREATE_AUDIT = f"""
CREATE TABLE IF NOT EXISTS {AUDIT_TABLE} (
    id          bigserial PRIMARY KEY,
    name        text        NOT NULL,
    action      text        NOT NULL CONSTRAINT migration_audit_action_check
                            CHECK (action IN ('apply', 'rollback', 'baseline', 'restore')),
    checksum    text,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text        NOT NULL,
    run_id      text,
    duration_ms integer,
    approver    text,
    comment     text,
    fingerprint text
)
"""
#: columns added after the first release: a table created before them gets them on the next apply
_LATER_COLUMNS = ("approver", "comment", "fingerprint")


@dataclass(frozen=True)
class ApprovalRecord:
    """Who approved the plan being applied, why, and the fingerprint of the plan they read."""

    approver: str | None  # None: the run needed no approval
    comment: str | None
    fingerprint: str


@dataclass(frozen=True)
class AppliedMigration:
    """One row of the history, with the checksum recorded when it was applied (if any)."""

    name: str
    applied_at: datetime.datetime
    checksum: str | None


def default_actor(actor: str | None = None) -> str:
    """Return ``actor``, else the OS user."""
    if actor:
        return actor
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _table_exists(db: peewee.Database, table: str) -> bool:
    return db.execute_sql("SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]


def read_applied(db: peewee.Database) -> list[AppliedMigration]:
    """Return the applied migrations in the order they were applied; empty if none ever were."""
    if not _table_exists(db, HISTORY_TABLE):
        return []
    if _table_exists(db, AUDIT_TABLE):
        sql = f"""
            SELECT h.name, h.migrated_at, (
                SELECT a.checksum FROM {AUDIT_TABLE} a
                WHERE a.name = h.name AND a.action IN ('apply', 'baseline')
                ORDER BY a.id DESC LIMIT 1)
            FROM {HISTORY_TABLE} h ORDER BY h.id"""
    else:
        sql = f"SELECT name, migrated_at, NULL FROM {HISTORY_TABLE} ORDER BY id"
    # peewee-migrate writes migrated_at as a naive UTC time: say so
    return [AppliedMigration(name, _as_utc(at), checksum)
            for name, at, checksum in db.execute_sql(sql).fetchall()]


def _as_utc(moment: datetime.datetime) -> datetime.datetime:
    return moment.replace(tzinfo=datetime.timezone.utc) if moment.tzinfo is None else moment


def _columns(db: peewee.Database, table: str) -> set[str]:
    return {row[0] for row in db.execute_sql(
        "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 "
        "AND NOT attisdropped", (table,)).fetchall()}


def ensure_audit_table(db: peewee.Database) -> None:
    """Create ``migration_audit`` if missing, or add the columns it lacks (inside the caller's transaction)."""
    db.execute_sql(_CREATE_AUDIT)
    missing = [c for c in _LATER_COLUMNS if c not in _columns(db, AUDIT_TABLE)]
    if missing:  # only then: ALTER TABLE takes a lock, even with IF NOT EXISTS
        db.execute_sql(f"ALTER TABLE {AUDIT_TABLE} " + ", ".join(
            f"ADD COLUMN IF NOT EXISTS {c} text" for c in missing))


def allow_baseline_rows(db: peewee.Database) -> None:
    """Let an audit table made before ``dbmigrate baseline`` (or ``restore``'s audit) existed take
    'baseline' and 'restore' rows."""
    db.execute_sql(f"ALTER TABLE {AUDIT_TABLE} DROP CONSTRAINT IF EXISTS migration_audit_action_check")
    db.execute_sql(f"ALTER TABLE {AUDIT_TABLE} ADD CONSTRAINT migration_audit_action_check "
                   "CHECK (action IN ('apply', 'rollback', 'baseline', 'restore'))")


def record_audit(db: peewee.Database, *, name: str, action: str, checksum: str | None,
                 actor: str, run_id: str | None, duration_ms: int | None,
                 approval: ApprovalRecord | None = None) -> None:
    """Insert one audit row (inside the caller's transaction, so it commits or rolls back with it)."""
    db.execute_sql(
        f"INSERT INTO {AUDIT_TABLE} (name, action, checksum, actor, run_id, duration_ms, "
        "approver, comment, fingerprint) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (name, action, checksum, actor, run_id, duration_ms,
         approval.approver if approval else None, approval.comment if approval else None,
         approval.fingerprint if approval else None),
    )


def read_audit(db: peewee.Database, limit: int = 100) -> list[dict]:
    """Return the newest audit rows first, as dicts; empty if the table does not exist.

    A table from before the approval columns reads as if they were empty (reads never write).
    """
    if not _table_exists(db, AUDIT_TABLE):
        return []
    have = _columns(db, AUDIT_TABLE)
    wanted = ["name", "action", "checksum", "at", "actor", "run_id", "duration_ms", *_LATER_COLUMNS]
    select = ", ".join(c if c in have else f"NULL AS {c}" for c in wanted)
    cursor = db.execute_sql(f"SELECT {select} FROM {AUDIT_TABLE} ORDER BY id DESC LIMIT %s", (limit,))
    return [dict(zip(wanted, row)) for row in cursor.fetchall()]
