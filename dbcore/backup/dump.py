"""Backups: ``pg_dump -Fc -Z0`` compressed with multi-threaded zstd and streamed to S3; list; prune.

No temp file and never the whole dump in memory on the way up: pg_dump's output is compressed
and cut into multipart-upload parts as it is read, and its sha256 and size are computed on the
way. pg_dump's own zlib is 4x slower than zstd level 1 for a similar size (bench/RESULTS.md), so
pg_dump writes uncompressed. Reading a backup back (verify, restore) is in ``dbcore/backup/restore.py``.
"""

from __future__ import annotations

import hashlib
import logging
import re
import string
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Protocol
from urllib.parse import quote, unquote

import psycopg2
import zstandard
from botocore.exceptions import BotoCoreError, ClientError

from dbcore.backup.pgtools import PgTool, find_pg_tool, libpq_args, server_major, tool_error
from dbcore.backup.storage import (
    PART_SIZE,
    MultipartUpload,
    Storage,
    abort_upload,
    delete,
    describe_error,
    head,
    is_transient,
    list_objects,
    open_storage,
    replace_metadata,
    unfinished_uploads,
)
from dbcore.connection import Target, connect_raw, raw_session
from dbcore.errors import BackupCorrupt, BackupFailed, ConfigError, StorageError
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)

#: told the bytes done so far (a backup, a restore, a copy); the migrations' own is dbcore.migrate.plan.Progress
BytesProgress = Callable[[int], None]


class Tee(Protocol):
    """A second consumer of a backup's compressed stream (a restore from the same bytes)."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self) -> tuple[int, str]: ...
S3_ERRORS = (BotoCoreError, ClientError)
CONTENT_TYPE = "application/vnd.postgresql.dump+zstd"
READ_SIZE = 1024 * 1024
SUFFIX = ".dump"
#: printable ASCII stays readable in the S3 console; "%" and anything else is %-quoted
_SAFE_IN_METADATA = "".join(c for c in string.punctuation if c != "%") + " "
_UNSAFE_IN_KEY = re.compile(r"[^A-Za-z0-9._-]+")
#: first key of the two-int advisory locks that claim an upload while it is written ("DMBU")
_UPLOAD_CLAIM = 0x444D4255


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
    #: major version of the server that was dumped (0: not recorded by older versions)
    server_major: int = 0

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
            server_major=int(meta.get("server-major") or 0),
        )


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
    with raw_session(target, "dbmigrate backup") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT pg_database_size(current_database())")
            return cur.fetchone()[0]


def _claim_upload(target: Target, key: str):
    """Return a session of ``target`` holding the claim on upload ``key`` while it is written.

    An unfinished upload whose claim is free was left by a backup that died (the S3 server or the
    tunnel went away before it could be aborted): the next backup of the database aborts it.
    """
    conn = connect_raw(target, "dbmigrate backup: upload")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('idle_session_timeout', '0', false)")
            cur.execute("SELECT pg_advisory_lock(%s, hashtext(%s))", (_UPLOAD_CLAIM, key))
    except psycopg2.Error as exc:
        conn.close()
        raise BackupFailed(f"cannot claim the upload of {key}: "
                           f"{error_line(exc, target.password)}") from None
    return conn


def _abort_dead_uploads(storage: Storage, claim, prefix: str) -> None:
    """Abort the unfinished uploads under ``prefix`` whose backup died (nobody claims them)."""
    with claim.cursor() as cur:
        for key, upload_id in unfinished_uploads(storage, prefix):
            cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_UPLOAD_CLAIM, key))
            if not cur.fetchone()[0]:
                continue  # another backup is writing it now
            try:
                abort_upload(storage, key, upload_id)
                log.warning("aborted the unfinished upload of %s: a backup that did not finish "
                            "left it", key)
            finally:
                cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_UPLOAD_CLAIM, key))


def _storage_failure(message: str, exc: BaseException) -> BackupFailed:
    """Return BackupFailed for an S3 error, retryable when the cause is passing (nothing was left)."""
    return BackupFailed(message, retryable=is_transient(exc))


def backup_to_s3(
    target: Target, settings: Settings, *, env: str | None = None, progress: BytesProgress | None = None,
    tee: Tee | None = None,
) -> BackupInfo:
    """Back ``target`` up to S3 and return what was stored; raise BackupFailed (nothing left behind).

    ``progress`` receives the bytes read from pg_dump so far (before compression). ``tee``
    receives every compressed chunk right after it is handed to the upload, in order: the very
    bytes of the stored object (a restore from the same stream, dbcore/backup/stream.py). Its
    ``finish()`` is awaited before the upload completes and must return the size and sha256 of
    the stored bytes: an error or a mismatch fails the backup and aborts the upload.
    """
    storage = open_storage(settings, str(env or target.env))
    with raw_session(target, "dbmigrate backup") as conn:
        try:
            major = server_major(conn)
            last_migration = last_applied_migration(conn)
        except psycopg2.Error as exc:
            raise BackupFailed(f"cannot read the migration history of {target.dbname}: "
                               f"{error_line(exc, target.password)}") from None
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
    claim = _claim_upload(target, key)
    upload = MultipartUpload(storage, key, CONTENT_TYPE)
    completing = False
    try:
        _abort_dead_uploads(storage, claim, key.rsplit("/", 1)[0] + "/")
        upload.start()
        put = upload.put if tee is None else _both(upload.put, tee.write)
        size, sha256 = _dump_compressed(pg_dump, target, settings, put, progress)
        if tee is not None and (teed := tee.finish()) != (size, sha256):
            raise BackupCorrupt(f"{what}: the stream consumer saw {teed[0]} bytes (sha256 {teed[1]}), "
                                f"the upload {size} bytes (sha256 {sha256}): nothing was stored")
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
    finally:
        claim.close()  # releases the claim: from now on a leftover of this upload is dead
    info = BackupInfo(
        key=key, bucket=storage.bucket, size=size, sha256=sha256, database=target.dbname,
        env=env_name, last_migration=last_migration, pg_dump_version=pg_dump.version,
        compression=compression, created_at=created_at, server_major=major,
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


def _both(first: Callable[[bytes], None], second: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """Return a callback handing each chunk to ``first``, then ``second``."""
    def both(chunk: bytes) -> None:
        first(chunk)
        second(chunk)
    return both


def _dump_compressed(
    pg_dump: PgTool, target: Target, settings: Settings, put: Callable[[bytes], None],
    progress: BytesProgress | None,
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
        assert proc.stdout is not None  # stdout=PIPE
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
                    f"{tool_error(stderr.read(), 'pg_dump', target.password)}"
                ) from None
            emit(chunker.finish())
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            proc.stdout.close()
    return size, digest.hexdigest()


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
