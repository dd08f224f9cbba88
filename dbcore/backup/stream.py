"""Restore a backup from its own stream, while it is uploaded: the rehearsal's copy without a download.

``backup_to_s3(..., tee=restore.write)`` hands every compressed chunk of the object it stores to
a :class:`StreamRestore`, which hashes it, decompresses it in a thread and feeds ``pg_restore``
through a pipe. Before the upload completes, the sha256 and size of the bytes restored are compared
with those uploaded: the copy was made from exactly the backup in the bucket, and that backup
restores; a failed restore or a mismatch leaves no object behind. ``pg_restore`` reads a pipe
with one job only, as a hand-made ``pg_dump | pg_restore`` does.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import tempfile
import time
from typing import Any

import zstandard

from dbcore.backup.dump import BytesProgress
from dbcore.backup.pgtools import find_pg_tool, tool_error
from dbcore.backup.pipes import BackgroundWriter
from dbcore.backup.restore import create_database, inspect_target, pg_restore_command
from dbcore.connection import Target
from dbcore.errors import BackupCorrupt, RestoreFailed, RestoreRefused

log = logging.getLogger(__name__)


class StreamRestore:
    """A new database restored from compressed backup chunks as they are written.

    Use as a context manager: entering creates ``into`` (which must not exist, or be empty) and
    starts pg_restore; :meth:`write` takes the chunks; :meth:`finish` waits for pg_restore and
    returns (size, sha256) of what it was given. Leaving on an error stops pg_restore; the
    caller drops the half-restored database.
    """

    def __init__(self, into: Target | None, backup_env: str, progress: BytesProgress | None = None):
        self.into, self.backup_env, self.progress = into, backup_env, progress
        self.size, self._digest = 0, hashlib.sha256()
        self._proc: Any = None  # pg_restore, once entered
        self._writer: Any = None  # its BackgroundWriter, while it runs
        self._stderr = tempfile.TemporaryFile()
        self.started = 0.0

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        assert self.into is not None  # ArchiveCheck, which has none, has its own command
        major = _prepare(self.into)
        return pg_restore_command(find_pg_tool("pg_restore", major), self.into, self.backup_env)

    def __enter__(self) -> StreamRestore:
        self.started = time.monotonic()
        cmd, env = self._command()
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                      stderr=self._stderr, env=env)
        self._writer = BackgroundWriter(self._proc.stdin, decompress=True).__enter__()
        return self

    def write(self, chunk: bytes) -> None:
        """Hash ``chunk`` and queue it for pg_restore; raise RestoreFailed if pg_restore stopped."""
        self._digest.update(chunk)
        self.size += len(chunk)
        try:
            self._writer.write(chunk)
        except (BrokenPipeError, OSError) as exc:
            raise self._failure() from exc
        except zstandard.ZstdError as exc:
            raise BackupCorrupt(f"the backup stream cannot be decompressed ({exc})") from exc
        if self.progress:
            self.progress(self.size)

    def finish(self) -> tuple[int, str]:
        """Wait for pg_restore to load everything; return (size, sha256) of the bytes restored."""
        writer, self._writer = self._writer, None
        try:
            writer.__exit__(None, None, None)
        except (BrokenPipeError, OSError) as exc:
            raise self._failure() from exc
        self._proc.stdin.close()
        if self._proc.wait() != 0:
            raise self._failure()
        log.info("pg_restore read %s bytes of the backup stream (%s) in %.1fs", self.size,
                 self.into.dbname if self.into else "the whole archive", time.monotonic() - self.started)
        return self.size, self._digest.hexdigest()

    def _failure(self) -> RestoreFailed:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._stderr.seek(0)
        where = f"into {self.into.dbname}" if self.into else "(reading it back)"
        password = self.into.password if self.into else None
        return RestoreFailed(f"pg_restore of the backup stream {where} failed: "
                             f"{tool_error(self._stderr.read(), 'pg_restore', password)}")

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._writer is not None:
            try:
                self._writer.__exit__(exc_type, exc, tb)
            except Exception:  # noqa: BLE001 - the error being raised is the one to report
                pass
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


class ArchiveCheck(StreamRestore):
    """The backup's stream read back whole by ``pg_restore --file=/dev/null``, loading nothing.

    Where the rehearsal's copy is made another way (``CREATE DATABASE ... TEMPLATE``), this still
    shows that the stored bytes are a complete archive pg_restore reads entry by entry, data
    included, and that they are the bytes uploaded (size and sha256, as for a restore).
    """

    def __init__(self, server_major: int, progress: BytesProgress | None = None):
        super().__init__(None, "", progress)
        self.server_major = server_major

    def _command(self) -> tuple[list[str], dict[str, str] | None]:
        return [str(find_pg_tool("pg_restore", self.server_major).path), f"--file={os.devnull}"], None


def _prepare(into: Target) -> int:
    """Create ``into`` (refusing one that holds objects); return its server's major version."""
    state = inspect_target(into)
    if state.relations:
        raise RestoreRefused(f"database {into.dbname} is not empty ({state.relations} objects, e.g. "
                             f"{', '.join(state.examples)}): a streamed restore needs a new database")
    if not state.exists:
        create_database(into)
    return state.server_major
