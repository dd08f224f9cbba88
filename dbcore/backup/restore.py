"""Reading a backup back: download, check, verify with pg_restore --list, restore.

Restore downloads to a temp file, because ``pg_restore -j`` cannot read a pipe, hashing the
stored bytes as they arrive while a thread decompresses them, and checks the checksum before it
creates or touches the target database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psycopg2
import zstandard
from psycopg2 import sql

from dbcore.backup.dump import S3_ERRORS, BackupInfo, BytesProgress
from dbcore.backup.pgtools import PgTool, find_pg_tool, libpq_args, server_major, tool_error
from dbcore.backup.pipes import BackgroundWriter
from dbcore.backup.storage import Storage, describe_error, head, is_missing_key, open_storage, read_chunks
from dbcore.connection import Env, Target, connect_raw, raw_session
from dbcore.errors import (
    BackupCorrupt,
    BackupNotFound,
    DatabaseUnavailable,
    RestoreFailed,
    RestoreRefused,
    StorageError,
)
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class VerifyReport:
    """A backup that was downloaded, matched its checksum and was read by pg_restore."""

    key: str
    size: int
    sha256: str
    toc_entries: int  # objects pg_restore --list found
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class RestoreReport:
    """A backup restored into a database."""

    key: str
    database: str
    size: int
    jobs: int
    created_database: bool
    forced: bool
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


# -- read back: fetch, verify, restore


def _fetch(storage: Storage, key: str, dest: Path, progress: BytesProgress | None) -> BackupInfo:
    """Download ``key`` into ``dest`` decompressed; return its info, or raise BackupCorrupt/BackupNotFound."""
    try:
        info = BackupInfo.from_metadata(key, storage.bucket, head(storage, key)["Metadata"])
    except (KeyError, ValueError) as exc:
        raise BackupCorrupt(f"backup {key} has no usable metadata ({exc}): it was not written "
                            "by dbmigrate backup, or its upload did not finish") from None
    except S3_ERRORS as exc:
        if is_missing_key(exc):
            raise BackupNotFound(f"no backup {key} in {storage.where}: "
                                 "`dbmigrate backups` lists the stored ones") from None
        raise StorageError(f"cannot read backup {key}: {describe_error(exc, storage)}") from exc
    if info.compression.startswith("zstd"):
        decompress = True
    elif info.compression == "none":
        decompress = False
    else:
        raise BackupCorrupt(f"backup {key} uses unknown compression {info.compression!r}")
    digest, size = hashlib.sha256(), 0
    try:
        # one pass: hashed as it arrives, decompressed and written by a thread meanwhile
        with open(dest, "wb") as out, BackgroundWriter(out, decompress) as writer:
            for chunk in read_chunks(storage, key):
                digest.update(chunk)
                size += len(chunk)
                writer.write(chunk)
                if progress:
                    progress(size)
    except zstandard.ZstdError as exc:
        raise BackupCorrupt(f"backup {key} cannot be decompressed ({exc}): it is damaged; "
                            "do not use it, take a new backup or pick an older one") from exc
    except S3_ERRORS as exc:
        raise StorageError(f"cannot download backup {key}: {describe_error(exc, storage)}") from exc
    if digest.hexdigest() != info.sha256 or size != info.size:
        raise BackupCorrupt(
            f"backup {key} is corrupt: its sha256 is {digest.hexdigest()} ({size} bytes) but its "
            f"metadata says {info.sha256} ({info.size} bytes): do not use it, take a new backup "
            "or pick an older one"
        )
    return info


def _archive_entries(pg_restore: PgTool, path: Path, key: str) -> int:
    """Return how many TOC entries pg_restore reads in the archive; raise BackupCorrupt if it cannot."""
    result = subprocess.run([str(pg_restore.path), "--list", str(path)], capture_output=True)
    if result.returncode != 0:
        raise BackupCorrupt(f"pg_restore cannot read backup {key}: "
                            f"{tool_error(result.stderr, 'pg_restore', None)}")
    lines = result.stdout.decode(errors="replace").splitlines()
    return sum(1 for line in lines if line and not line.startswith(";"))


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackupCorrupt(f"the backup's metadata names pg_dump version {version!r}, which "
                            "is not a version: the object was not written by dbmigrate") from None


def verify_backup(key: str, settings: Settings, progress: BytesProgress | None = None) -> VerifyReport:
    """Download ``key``, check its sha256 and read it with pg_restore; raise BackupCorrupt if any fails."""
    storage = open_storage(settings)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="dbmigrate-verify-") as tmp:
        path = Path(tmp) / "backup.dump"
        info = _fetch(storage, key, path, progress)
        entries = _archive_entries(find_pg_tool("pg_restore", _major(info.pg_dump_version)), path, key)
    return VerifyReport(key=key, size=info.size, sha256=info.sha256, toc_entries=entries,
                        seconds=round(time.monotonic() - started, 3))


@dataclass(frozen=True)
class RestoreTarget:
    """A database about to be restored into: whether it exists, what it holds, its server's major."""

    exists: bool
    relations: int
    examples: list[str]
    server_major: int


def inspect_target(into: Target) -> RestoreTarget:
    """Return whether ``into`` exists, what it holds, and its server's major version."""
    try:
        conn = connect_raw(into, "dbmigrate restore")
    except DatabaseUnavailable as exc:
        if "does not exist" not in str(exc):
            raise
        with raw_session(into.with_dbname("postgres"), "dbmigrate restore") as admin:
            return RestoreTarget(False, 0, [], server_major(admin))
    try:
        count, names = user_relations(conn)
        return RestoreTarget(True, count, names, server_major(conn))
    finally:
        conn.close()


def create_database(into: Target) -> None:
    """Create ``into`` on its server; raise RestoreFailed."""
    with raw_session(into.with_dbname("postgres"), "dbmigrate restore") as admin:
        try:
            with admin.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(into.dbname)))
        except psycopg2.Error as exc:
            raise RestoreFailed(f"cannot create database {into.dbname} to restore into: "
                                f"{error_line(exc, into.password)}: create it first") from None
    log.info("created database %s to restore into", into.dbname)


_USER_OBJECTS = """
WITH user_ns AS (
    SELECT oid, nspname FROM pg_namespace
    WHERE nspname NOT IN ('pg_catalog', 'information_schema')
      AND nspname NOT LIKE 'pg\\_toast%%' AND nspname NOT LIKE 'pg\\_temp%%'
), from_extensions AS (
    SELECT objid FROM pg_depend WHERE deptype = 'e'
), objects AS (
    SELECT 0 AS rank, n.nspname || '.' || c.relname AS name
    FROM pg_class c JOIN user_ns n ON n.oid = c.relnamespace
    WHERE c.oid NOT IN (SELECT objid FROM from_extensions)
    UNION ALL
    SELECT 1, 'function ' || n.nspname || '.' || p.proname
    FROM pg_proc p JOIN user_ns n ON n.oid = p.pronamespace
    WHERE p.oid NOT IN (SELECT objid FROM from_extensions)
    UNION ALL
    SELECT 2, 'type ' || n.nspname || '.' || t.typname
    FROM pg_type t JOIN user_ns n ON n.oid = t.typnamespace
    WHERE t.typrelid = 0 AND t.typelem = 0 AND t.oid NOT IN (SELECT objid FROM from_extensions)
    UNION ALL
    SELECT 3, 'schema ' || nspname FROM user_ns WHERE nspname <> 'public'
    UNION ALL
    SELECT 4, 'extension ' || extname FROM pg_extension WHERE extname <> 'plpgsql'
)
SELECT count(*) OVER (), name FROM objects ORDER BY rank, name LIMIT %s
"""


def user_relations(conn, limit: int = 5) -> tuple[int, list[str]]:
    """Return how many objects of its own the database holds (tables, views, functions, types,
    schemas, extensions), and a few names."""
    with conn.cursor() as cur:
        cur.execute(_USER_OBJECTS, (limit,))
        rows = cur.fetchall()
    return (rows[0][0] if rows else 0), [name for _, name in rows]


def restore_backup(
    key: str, into: Target, settings: Settings, *, force: bool = False,
    allow_production: bool = False, jobs: int | None = None, progress: BytesProgress | None = None,
) -> RestoreReport:
    """Restore backup ``key`` into ``into`` (created if missing); raise RestoreRefused, BackupCorrupt or RestoreFailed.

    ``progress`` receives the bytes of the stored object downloaded so far.
    """
    if into.env is not Env.LOCAL and not allow_production:
        # proxy is production too, reached through the tunnel
        raise RestoreRefused(
            f"refusing to restore into the {into.env} database {into.dbname}: pass "
            "--allow-production (allow_production=True) if overwriting it is really meant"
        )
    storage = open_storage(settings, str(into.env))
    started = time.monotonic()
    state = inspect_target(into)
    if state.relations and not force:
        raise RestoreRefused(
            f"database {into.dbname} is not empty ({state.relations} objects, e.g. "
            f"{', '.join(state.examples)}): restore into a new database, or pass --force to overwrite it"
        )
    pg_restore = find_pg_tool("pg_restore", state.server_major)
    jobs = jobs or min(4, os.cpu_count() or 2)
    with tempfile.TemporaryDirectory(prefix="dbmigrate-restore-") as tmp:
        path = Path(tmp) / "backup.dump"
        # the whole object is checked before the target is touched (or even created)
        info = _fetch(storage, key, path, progress)
        # a newer pg_dump may have dumped an older server: the dumped server's major counts
        source_major = info.server_major or _major(info.pg_dump_version)
        if source_major > state.server_major:
            raise RestoreRefused(
                f"{key} holds a PostgreSQL {source_major} database (pg_dump "
                f"{info.pg_dump_version}), newer than the PostgreSQL {state.server_major} server "
                f"of {into.dbname}: restore it into a server of version {source_major} or later")
        if pg_restore.major < _major(info.pg_dump_version):
            # an archive of a newer pg_dump needs a pg_restore at least as new
            pg_restore = find_pg_tool("pg_restore", _major(info.pg_dump_version))
        _archive_entries(pg_restore, path, key)
        if not state.exists:
            create_database(into)
        _run_pg_restore(pg_restore, path, into, info, jobs=jobs, clean=bool(state.relations))
    log.info("restored %s into %s", key, into.masked_url)
    return RestoreReport(key=key, database=into.dbname, size=info.size, jobs=jobs,
                         created_database=not state.exists, forced=bool(state.relations),
                         seconds=round(time.monotonic() - started, 3))


def pg_restore_command(pg_restore: PgTool, into: Target, backup_env: str) -> tuple[list[str], dict[str, str]]:
    """Return the pg_restore command line (without its input) and environment for restoring into ``into``."""
    conninfo, env = libpq_args(into)
    cmd = [str(pg_restore.path), "--exit-on-error", "--no-password", f"--dbname={conninfo}"]
    if backup_env != str(into.env):
        # another environment's roles (the owners and grantees) need not exist here
        cmd += ["--no-owner", "--no-privileges"]
    return cmd, env


def _run_pg_restore(pg_restore: PgTool, path: Path, into: Target, info: BackupInfo, *,
                    jobs: int, clean: bool) -> None:
    cmd, env = pg_restore_command(pg_restore, into, info.env)
    cmd.append(f"--jobs={jobs}")
    if clean:
        cmd += ["--clean", "--if-exists"]
    result = subprocess.run([*cmd, str(path)], capture_output=True, env=env)
    if result.returncode != 0:
        raise RestoreFailed(
            f"pg_restore of {info.key} into {into.dbname} failed: "
            f"{tool_error(result.stderr, 'pg_restore', into.password)}: the database may be "
            "partly restored; restore into a new database, or again with --force"
        ) from None
