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

import psycopg2
from psycopg2 import sql

from dbcore.backup.dump import BytesProgress
from dbcore.backup.pgtools import find_pg_tool, libpq_args, server_major
from dbcore.backup.restore import restore_backup
from dbcore.checks.post import check_no_invalid_indexes
from dbcore.connection import Target, raw_session
from dbcore.deploy.scratch import derived_name
from dbcore.errors import RestoreFailed, SchemaSnapshotFailed
from dbcore.redact import redact
from dbcore.settings import Settings

log = logging.getLogger(__name__)


def schema_snapshot(target: Target) -> str:
    """Return the database's schema as pg_dump writes it, without lines that differ run to run.

    pg_dump leaves INVALID indexes out (a failed CREATE INDEX CONCURRENTLY): they are listed
    at the end, so that a comparison sees them.
    """
    with raw_session(target, "dbmigrate snapshot") as conn:
        try:
            major = server_major(conn)
        except psycopg2.Error as exc:
            raise SchemaSnapshotFailed(f"cannot read the schema of {target.dbname}: "
                                       f"{redact(str(exc).strip(), target.password)}") from None
    invalid = [f"INVALID INDEX {i.schema}.{i.index}" for i in check_no_invalid_indexes(target)]
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
        [line for line in result.stdout.splitlines()
         if line.strip() and not line.startswith(("\\restrict", "\\unrestrict", "--"))] + invalid
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
                     progress: BytesProgress | None = None, kept_infix: str = "_failed_"
                     ) -> InPlaceRestore:
    """Replace ``target``'s database by the backup ``key``; the old one is kept renamed (``kept_infix``).

    Raises BackupCorrupt/RestoreFailed before the live database is touched when the backup is bad.
    Writes made after the backup was taken stay only in the kept database.
    """
    started = time.monotonic()
    suffix = run_id.replace("-", "")[:8]
    fresh = target.with_dbname(derived_name(target.dbname, f"_restored_{suffix}"))
    kept = derived_name(target.dbname, f"{kept_infix}{suffix}")
    # Everything that can fail slowly happens on the new database: the live one is untouched.
    restore_backup(key, fresh, settings, allow_production=True, progress=progress)
    with raw_session(target.with_dbname("postgres"), "dbmigrate restore") as admin:
        try:
            with admin.cursor() as cur:
                _copy_database_properties(cur, target.dbname, fresh.dbname)
                _swap(cur, target.dbname, fresh.dbname, kept)
        except psycopg2.Error as exc:
            raise RestoreFailed(
                f"restored {key} into {fresh.dbname} but could not swap it in for {target.dbname}: "
                f"{redact(str(exc).strip(), target.password)}: check that {target.dbname} exists and "
                f"accepts connections (ALTER DATABASE ... ALLOW_CONNECTIONS true), then rename "
                f"{fresh.dbname} to it by hand"
            ) from None
    log.info("restored %s over %s; the previous database is kept as %s", key, target.dbname, kept)
    return InPlaceRestore(key, target.dbname, kept, round(time.monotonic() - started, 3))


def _copy_database_properties(cur, source: str, dest: str) -> None:
    """Give ``dest`` the owner, per-database settings and privileges of ``source``.

    pg_restore without --create restores what is inside a database, not the database itself.
    """
    ident = sql.Identifier(dest)
    cur.execute("SELECT oid, pg_get_userbyid(datdba), datacl IS NULL FROM pg_database "
                "WHERE datname = %s", (source,))
    oid, owner, default_acl = cur.fetchone()
    cur.execute(sql.SQL("ALTER DATABASE {} OWNER TO {}").format(ident, sql.Identifier(owner)))
    cur.execute("SELECT coalesce(pg_get_userbyid(NULLIF(setrole, 0)), ''), unnest(setconfig) "
                "FROM pg_db_role_setting WHERE setdatabase = %s", (oid,))
    for role, setting in cur.fetchall():
        name, _, value = setting.partition("=")
        if role:
            statement = sql.SQL("ALTER ROLE {} IN DATABASE {} SET {} = {}").format(
                sql.Identifier(role), ident, sql.Identifier(name), sql.Literal(value))
        else:
            statement = sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                ident, sql.Identifier(name), sql.Literal(value))
        cur.execute(statement)
    if default_acl:
        return
    cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM PUBLIC").format(ident))
    cur.execute("SELECT coalesce(pg_get_userbyid(NULLIF(a.grantee, 0)), ''), a.privilege_type "
                "FROM pg_database d, aclexplode(d.datacl) a WHERE d.datname = %s", (source,))
    for grantee, privilege in cur.fetchall():
        to = sql.Identifier(grantee) if grantee else sql.SQL("PUBLIC")
        cur.execute(sql.SQL("GRANT {} ON DATABASE {} TO {}").format(sql.SQL(privilege), ident, to))


def _swap(cur, live: str, fresh: str, kept: str) -> None:
    """Rename ``live`` to ``kept`` and ``fresh`` to ``live``; on failure, put ``live`` back."""
    live_id, fresh_id, kept_id = (sql.Identifier(n) for n in (live, fresh, kept))
    # Refuse new sessions, end the current ones, then swap: the app sees a short outage.
    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS false").format(live_id))
    renamed = False
    try:
        cur.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()", (live,))
        cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(live_id, kept_id))
        renamed = True
        cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(fresh_id, live_id))
    except psycopg2.Error:
        if renamed:  # the live name is free: give it back to the database that had it
            cur.execute(sql.SQL("ALTER DATABASE {} RENAME TO {}").format(kept_id, live_id))
        cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(live_id))
        raise
    cur.execute(sql.SQL("ALTER DATABASE {} ALLOW_CONNECTIONS true").format(kept_id))
