"""Backups: ``pg_dump -Fc -Z0`` compressed with multi-threaded zstd and streamed to S3; verify; restore.

No temp file and never the whole dump in memory on the way up: pg_dump's output is compressed
and cut into multipart-upload parts as it is read, and its sha256 and size are computed on the
way. pg_dump's own zlib is 4x slower than zstd level 1 for a similar size (bench/RESULTS.md), so
pg_dump writes uncompressed. Restore downloads to a temp file, because ``pg_restore -j`` cannot
read a pipe, and checks the checksum before it touches the target database.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import re
import string
import subprocess
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable
from urllib.parse import quote, unquote

import psycopg2
import zstandard
from botocore.exceptions import BotoCoreError, ClientError
from psycopg2 import sql

from dbcore.connection import Env, Target, connect_raw, redact
from dbcore.errors import (
    BackupCorrupt,
    BackupFailed,
    BackupNotFound,
    ConfigError,
    DatabaseUnavailable,
    RestoreFailed,
    RestoreRefused,
    StorageError,
)
from dbcore.pgtools import PgTool, find_pg_tool, libpq_args, server_major
from dbcore.settings import Settings
from dbcore.storage import (
    PART_SIZE,
    MultipartUpload,
    Storage,
    delete,
    describe_error,
    is_transient,
    head,
    is_missing_key,
    list_objects,
    open_storage,
    read_chunks,
    replace_metadata,
)

log = logging.getLogger(__name__)

Progress = Callable[[int], None]
S3_ERRORS = (BotoCoreError, ClientError)
CONTENT_TYPE = "application/vnd.postgresql.dump+zstd"
READ_SIZE = 1024 * 1024
#: downloaded chunks (of about 1 MiB) waiting for the decompression thread
FETCH_AHEAD = 8
SUFFIX = ".dump"
#: printable ASCII stays readable in the S3 console; "%" and anything else is %-quoted
_SAFE_IN_METADATA = "".join(c for c in string.punctuation if c != "%") + " "
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class BackupInfo:
    """A stored backup: where it is, what it holds and how to check it."""

    key: str
    bucket: str
    size: int  # bytes stored (compressed)
    sha256: str  # of the stored bytes
    database: str
    env: str
    last_migration: str  # "none" when no migration was applied
    pg_dump_version: str
    compression: str  # "zstd:LEVEL" or "none"
    created_at: datetime

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (created_at in ISO 8601)."""
        data = asdict(self)
        data["created_at"] = self.created_at.isoformat()
        return data

    def to_metadata(self) -> dict[str, str]:
        """Return the S3 user metadata recorded with the object (ASCII only, so values are quoted)."""
        fields = self.to_dict()
        del fields["key"], fields["bucket"]  # they are the object's address, not its metadata
        return {name.replace("_", "-"): quote(str(value), safe=_SAFE_IN_METADATA)
                for name, value in fields.items()}

    @classmethod
    def from_metadata(cls, key: str, bucket: str, metadata: dict[str, str]) -> BackupInfo:
        """Return the info recorded in an object's metadata; raise KeyError/ValueError when it lacks some."""
        meta = {name.lower(): unquote(value) for name, value in metadata.items()}
        return cls(
            key=key, bucket=bucket, size=int(meta["size"]), sha256=meta["sha256"],
            database=meta["database"], env=meta["env"], last_migration=meta["last-migration"],
            pg_dump_version=meta["pg-dump-version"], compression=meta["compression"],
            created_at=datetime.fromisoformat(meta["created-at"]),
        )


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


# -- backup


def backup_key(prefix: str, env: str, database: str, created_at: datetime, last_migration: str) -> str:
    """Return ``<prefix>/<env>/<dbname>/<UTC timestamp>_<last migration>.dump``."""
    stamp = created_at.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
    parts = [prefix, _UNSAFE_IN_KEY.sub("_", env), _UNSAFE_IN_KEY.sub("_", database),
             f"{stamp}_{_UNSAFE_IN_KEY.sub('_', last_migration)}{SUFFIX}"]
    return "/".join(p for p in parts if p)


def last_applied_migration(conn) -> str:
    """Return the name of the last migration in peewee-migrate's history, or "none"."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('migratehistory') IS NOT NULL")
        if not cur.fetchone()[0]:
            return "none"
        cur.execute("SELECT name FROM migratehistory ORDER BY id DESC LIMIT 1")
        row = cur.fetchone()
    return row[0] if row else "none"


def database_size(target: Target) -> int:
    """Return the database's size on disk in bytes (what a backup's progress is measured against)."""
    conn = connect_raw(target, "dbmigrate-backup")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            return cur.fetchone()[0]
    finally:
        conn.close()


def _storage_failure(message: str, exc: BaseException) -> BackupFailed:
    """Return BackupFailed for an S3 error, retryable when the cause is passing (nothing was left)."""
    error = BackupFailed(message)
    error.retryable = is_transient(exc)
    return error


def backup_to_s3(
    target: Target, settings: Settings, *, env: str | None = None, progress: Progress | None = None
) -> BackupInfo:
    """Back ``target`` up to S3 and return what was stored; raise BackupFailed (nothing left behind).

    ``progress`` receives the bytes read from pg_dump so far (before compression).
    """
    storage = open_storage(settings, str(env or target.env))
    conn = connect_raw(target, "dbmigrate-backup")
    try:
        major = server_major(conn)
        last_migration = last_applied_migration(conn)
    except psycopg2.Error as exc:
        raise BackupFailed(f"cannot read the migration history of {target.dbname}: "
                           f"{redact(str(exc).strip().splitlines()[0], target.password)}") from None
    finally:
        conn.close()
    pg_dump = find_pg_tool("pg_dump", major)
    created_at = datetime.now(timezone.utc)
    env_name = str(env or target.env)
    key = backup_key(storage.prefix, env_name, target.dbname, created_at, last_migration)
    what = f"backup of {target.dbname}"
    try:
        # fail before pg_dump starts when the bucket is missing, denied or unreachable
        storage.client.head_bucket(Bucket=storage.bucket)
    except S3_ERRORS as exc:
        raise _storage_failure(f"{what} failed: {describe_error(exc, storage)}", exc) from exc
    compression = f"zstd:{settings.backup_zstd_level}"
    log.info("backing %s up to s3://%s/%s (%s)", target.masked_url, storage.bucket, key, compression)
    upload = MultipartUpload(storage, key, CONTENT_TYPE)
    completing = False
    try:
        upload.start()
        size, sha256 = _dump_compressed(pg_dump, target, settings, upload.put, progress)
        completing = True
        upload.complete()
    except BaseException as exc:
        # once complete() was sent the object may exist: remove it, never leave one unchecked
        aborted = upload.abort()
        if completing:
            _delete_quietly(storage, key)
        if isinstance(exc, S3_ERRORS):
            left = ("" if aborted else f"; the unfinished upload of {key} could not be aborted: a "
                    "bucket lifecycle rule AbortIncompleteMultipartUpload removes such leftovers")
            raise _storage_failure(f"{what} failed: {describe_error(exc, storage)}{left}",
                                   exc) from exc
        raise
    info = BackupInfo(
        key=key, bucket=storage.bucket, size=size, sha256=sha256, database=target.dbname,
        env=env_name, last_migration=last_migration, pg_dump_version=pg_dump.version,
        compression=compression, created_at=created_at,
    )
    try:
        replace_metadata(storage, key, info.to_metadata(), CONTENT_TYPE)
    except BaseException as exc:
        # an object without its checksum is no backup: remove it rather than leave a trap
        _delete_quietly(storage, key)
        if isinstance(exc, S3_ERRORS):
            raise BackupFailed(f"{what} failed recording its metadata: "
                               f"{describe_error(exc, storage)}") from exc
        raise
    log.info("stored %s: %s bytes, sha256 %s", key, size, sha256)
    return info


def _dump_compressed(
    pg_dump: PgTool, target: Target, settings: Settings, put: Callable[[bytes], None],
    progress: Progress | None,
) -> tuple[int, str]:
    """Run pg_dump, hand zstd-compressed parts to ``put``; return (stored size, sha256)."""
    conninfo, env = libpq_args(target)
    cmd = [str(pg_dump.path), "--format=custom", "--compress=0", "--no-password",
           f"--dbname={conninfo}"]
    threads = settings.backup_zstd_threads or -1  # -1: one per core
    chunker = zstandard.ZstdCompressor(level=settings.backup_zstd_level, threads=threads).chunker(
        chunk_size=PART_SIZE
    )
    digest, size, read = hashlib.sha256(), 0, 0

    def emit(chunks) -> None:
        nonlocal size
        for chunk in chunks:
            digest.update(chunk)
            size += len(chunk)
            put(chunk)

    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, env=env)
        try:
            while data := proc.stdout.read(READ_SIZE):
                read += len(data)
                emit(chunker.compress(data))
                if progress:
                    progress(read)
            if proc.wait() != 0:
                stderr.seek(0)
                raise BackupFailed(
                    f"pg_dump of {target.dbname} failed: "
                    f"{_tool_error(stderr.read(), 'pg_dump', target.password)}"
                ) from None
            emit(chunker.finish())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    return size, digest.hexdigest()


def _tool_error(stderr: bytes, program: str, password: str | None) -> str:
    """Return the error lines of a client program's stderr as one line, password scrubbed."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[-3:]
    text = "; ".join(line.removeprefix(f"{program}: ") for line in errors) or "no error output"
    return redact(text, password)


# -- read back: fetch, verify, restore


def _fetch(storage: Storage, key: str, dest: Path, progress: Progress | None) -> BackupInfo:
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
        with open(dest, "wb") as out, _BackgroundWriter(out, decompress) as writer:
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


class _BackgroundWriter:
    """Decompress (if asked) and write chunks in a thread, so that the download goes on meanwhile.

    At most FETCH_AHEAD chunks wait in memory. An error of the thread (ZstdError, OSError) is
    raised by the next ``write`` or on leaving the ``with`` block.
    """

    def __init__(self, out, decompress: bool):
        self._sink = (zstandard.ZstdDecompressor().stream_writer(out, closefd=False)
                      if decompress else out)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=FETCH_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="backup-writer", daemon=True)

    def __enter__(self) -> _BackgroundWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                self._sink.write(chunk)
            self._sink.flush()
        except BaseException as exc:  # handed to the downloading thread
            self._error = exc
            while self._queue.get() is not None:  # never leave the producer blocked
                pass

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error


def _archive_entries(pg_restore: PgTool, path: Path, key: str) -> int:
    """Return how many TOC entries pg_restore reads in the archive; raise BackupCorrupt if it cannot."""
    result = subprocess.run([str(pg_restore.path), "--list", str(path)], capture_output=True)
    if result.returncode != 0:
        raise BackupCorrupt(f"pg_restore cannot read backup {key}: "
                            f"{_tool_error(result.stderr, 'pg_restore', None)}")
    lines = result.stdout.decode(errors="replace").splitlines()
    return sum(1 for line in lines if line and not line.startswith(";"))


def _major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError:
        raise BackupCorrupt(f"the backup's metadata names pg_dump version {version!r}, which "
                            "is not a version: the object was not written by dbmigrate") from None


def verify_backup(key: str, settings: Settings, progress: Progress | None = None) -> VerifyReport:
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
class _RestoreTarget:
    exists: bool
    relations: int
    examples: list[str]
    server_major: int


def _inspect(into: Target) -> _RestoreTarget:
    """Return whether ``into`` exists, what it holds, and its server's major version."""
    try:
        conn = connect_raw(into, "dbmigrate-restore")
    except DatabaseUnavailable as exc:
        if "does not exist" not in str(exc):
            raise
        admin = connect_raw(into.with_dbname("postgres"), "dbmigrate-restore")
        try:
            return _RestoreTarget(False, 0, [], server_major(admin))
        finally:
            admin.close()
    try:
        count, names = user_relations(conn)
        return _RestoreTarget(True, count, names, server_major(conn))
    finally:
        conn.close()


def _create_database(into: Target) -> None:
    admin = connect_raw(into.with_dbname("postgres"), "dbmigrate-restore")
    try:
        with admin.cursor() as cur:
            cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(into.dbname)))
    except psycopg2.Error as exc:
        raise RestoreFailed(f"cannot create database {into.dbname} to restore into: "
                            f"{str(exc).strip().splitlines()[0]}: create it first") from None
    finally:
        admin.close()
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
    allow_production: bool = False, jobs: int | None = None, progress: Progress | None = None,
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
    state = _inspect(into)
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
        if _major(info.pg_dump_version) > state.server_major:
            raise RestoreRefused(
                f"{key} was written by pg_dump {info.pg_dump_version}, newer than the PostgreSQL "
                f"{state.server_major} server of {into.dbname}: restore it into a server of "
                f"version {_major(info.pg_dump_version)} or later")
        _archive_entries(pg_restore, path, key)
        if not state.exists:
            _create_database(into)
        _run_pg_restore(pg_restore, path, into, info, jobs=jobs, clean=bool(state.relations))
    log.info("restored %s into %s", key, into.masked_url)
    return RestoreReport(key=key, database=into.dbname, size=info.size, jobs=jobs,
                         created_database=not state.exists, forced=bool(state.relations),
                         seconds=round(time.monotonic() - started, 3))


def _run_pg_restore(pg_restore: PgTool, path: Path, into: Target, info: BackupInfo, *,
                    jobs: int, clean: bool) -> None:
    conninfo, env = libpq_args(into)
    cmd = [str(pg_restore.path), "--exit-on-error", "--no-password", f"--jobs={jobs}",
           f"--dbname={conninfo}"]
    if info.env != str(into.env):
        # another environment's roles (the owners and grantees) need not exist here
        cmd += ["--no-owner", "--no-privileges"]
    if clean:
        cmd += ["--clean", "--if-exists"]
    result = subprocess.run([*cmd, str(path)], capture_output=True, env=env)
    if result.returncode != 0:
        raise RestoreFailed(
            f"pg_restore of {info.key} into {into.dbname} failed: "
            f"{_tool_error(result.stderr, 'pg_restore', into.password)}: the database may be "
            "partly restored; restore into a new database, or again with --force"
        ) from None


# -- list and prune


def list_backups(settings: Settings, *, database: str | None = None,
                 env: str | None = None) -> list[BackupInfo]:
    """Return the stored backups (of one database and/or environment if given), newest first."""
    storage = open_storage(settings)
    base = f"{storage.prefix}/" if storage.prefix else ""
    # keys hold the names made safe for a key: filter with the same spelling
    env_part = _UNSAFE_IN_KEY.sub("_", env) if env else None
    db_part = _UNSAFE_IN_KEY.sub("_", database) if database else None
    listing = base + (f"{env_part}/" + (f"{db_part}/" if db_part else "") if env_part else "")
    found = []
    try:
        for obj in list_objects(storage, listing):
            key = obj["Key"]
            rest = key[len(base):].split("/")
            if not key.endswith(SUFFIX) or len(rest) != 3:
                continue
            if db_part and rest[1] != db_part:
                continue
            try:
                found.append(BackupInfo.from_metadata(key, storage.bucket,
                                                      head(storage, key)["Metadata"]))
            except (KeyError, ValueError):
                log.warning("skipping %s: it has no backup metadata", key)
    except S3_ERRORS as exc:
        raise StorageError(f"cannot list backups: {describe_error(exc, storage)}") from exc
    return sorted(found, key=lambda b: (b.created_at, b.key), reverse=True)


def prune_backups(settings: Settings, keep: int, *, database: str | None = None,
                  env: str | None = None) -> list[str]:
    """Delete all but the ``keep`` newest backups of each database; return the deleted keys."""
    if keep < 1:
        raise ConfigError(f"prune --keep {keep}: keep at least 1 backup of each database")
    storage = open_storage(settings)
    seen: dict[tuple[str, str], int] = {}
    deleted = []
    for info in list_backups(settings, database=database, env=env):
        group = (info.env, info.database)
        seen[group] = seen.get(group, 0) + 1
        if seen[group] > keep:
            try:
                delete(storage, info.key)
            except S3_ERRORS as exc:
                raise StorageError(f"cannot delete {info.key}: {describe_error(exc, storage)}") from exc
            deleted.append(info.key)
            log.info("pruned %s", info.key)
    return deleted


def _delete_quietly(storage: Storage, key: str) -> None:
    try:
        delete(storage, key)
    except S3_ERRORS as exc:
        log.warning("could not delete %s: %s", key, describe_error(exc, storage))
