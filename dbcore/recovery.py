"""Getting back to the state before an apply: schema snapshots, and restoring a backup in place.

A rollback by the migrations' own ``rollback()`` functions is verified against a schema snapshot
taken before the apply. When that fails, the last resort restores the backup taken before the
apply: first into a new database (so a bad backup never costs the live one), then the two are
swapped by renaming; the broken database is kept under another name for inspection.
"""

from __future__ import annotations

import difflib
import logging
import subprocess
import time
from dataclasses import dataclass

from psycopg2 import sql

from dbcore.backup import Progress, restore_backup
from dbcore.connection import Target, connect_raw, redact
from dbcore.errors import DbcoreError, RestoreFailed
from dbcore.pgtools import find_pg_tool, libpq_args, server_major
from dbcore.settings import Settings

log = logging.getLogger(__name__)


class SchemaSnapshotFailed(DbcoreError):
    """pg_dump --schema-only could not read the database."""


def schema_snapshot(target: Target) -> str:
    """Return the database's schema as pg_dump writes it, without lines that differ run to run."""
    conn = connect_raw(target, "dbmigrate-snapshot")
    try:
        major = server_major(conn)
    finally:
        conn.close()
    pg_dump = find_pg_tool("pg_dump", major)
    conninfo, env = libpq_args(target)
    result = subprocess.run(
        [str(pg_dump.path), "--schema-only", "--no-owner", "--no-privileges", f"--dbname={conninfo}"],
        capture_output=True, text=True, env=env,
    )
    if result.returncode != 0:
        detail = redact(result.stderr.strip().splitlines()[-1] if result.stderr.strip() else "",
                        target.password)
        raise SchemaSnapshotFailed(f"pg_dump --schema-only of {target.dbname} failed: {detail}")
    # \restrict lines carry a random key; comments and blank lines carry nothing
    return "\n".join(
        line for line in result.stdout.splitlines()
        if line.strip() and not line.startswith(("\\restrict", "\\unrestrict", "--"))
    )


def snapshot_diff(before: str, after: str, limit: int = 60) -> list[str]:
    """Return the unified diff between two snapshots (empty when identical), at most ``limit`` lines."""
    diff = list(difflib.unified_diff(before.splitlines(), after.splitlines(), "before apply",
                                     "now", lineterm="", n=1))
    return diff[:limit]


@dataclass(frozen=True)
class InPlaceRestore:
    """A backup restored over a database by swapping in a freshly restored copy."""

    key: str
    database: str
    kept_as: str
    seconds: float

    def to_dict(self) -> dict:
        return {"key": self.key, "database": self.database, "kept_as": self.kept_as,
                "seconds": self.seconds}


def restore_in_place(key: str, target: Target, settings: Settings, *, run_id: str,
                     progress: Progress | None = None) -> InPlaceRestore:
    """Replace ``target``'s database by the backup ``key``; the old one is kept renamed.

    Raises BackupCorrupt/RestoreFailed before the live database is touched when the backup is bad.
    """
    started = time.monotonic()
    suffix = run_id[:8]
    fresh = target.with_dbname(f"{target.dbname[:40]}_restored_{suffix}")
    kept = f"{target.dbname[:42]}_failed_{suffix}"
    # Everything that can fail slowly happens on the new database: the live one is untouched.
    restore_backup(key, fresh, settings, allow_production=True, progress=progress)
    admin = connect_raw(target.with_dbname("postgres"), "dbmigrate-restore")
    live, old, new = (sql.Identifier(n) for n in (target.dbname, kept, fresh.dbname))
    try:
        with admin.cursor() as cur:
            # Refuse new sessions, end the current ones, then swap: the app sees a short outage.
            cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(live))
            try:
                cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = %s AND pid <> pg_backend_pid()", (target.dbname,))
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live, old))
                cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(new, live))
            finally:
                name = old if _exists(cur, kept) else live
                cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(name))
    except Exception as exc:
        raise RestoreFailed(
            f"restored {key} into {fresh.dbname} but could not swap it in for {target.dbname}: "
            f"{redact(str(exc).strip(), target.password)}: rename the databases by hand"
        ) from None
    finally:
        admin.close()
    log.info("restored %s over %s; the previous database is kept as %s", key, target.dbname, kept)
    return InPlaceRestore(key, target.dbname, kept, round(time.monotonic() - started, 3))


def _exists(cur, dbname: str) -> bool:
    cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
    return cur.fetchone() is not None
