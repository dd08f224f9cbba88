"""The migration advisory lock, and the timeouts every migration session runs under.

One PostgreSQL session advisory lock serialises every apply and rollback on a database. It is
taken by polling ``pg_try_advisory_lock`` on a connection of its own, so that waiting is bounded
and the holder can be named when the wait gives up.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from typing import Iterator

import peewee

from dbcore.connection import Target, raw_session
from dbcore.errors import MigrationLockTimeout
from dbcore.sandbox import report_backend
from dbcore.settings import Settings

log = logging.getLogger(__name__)

POLL_SECONDS = 0.2

_HOLDER_SQL = """
SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.usename, ''),
       a.backend_start, coalesce(host(a.client_addr), 'local socket')
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.locktype = 'advisory' AND l.granted AND l.database = (
        SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid = %s::bigint::oid AND l.objid = %s::bigint::oid AND l.objsubid = 1
"""


def lock_holder(conn, key: int) -> tuple | None:
    """Return (pid, application, user, connected since, client) of the session holding the
    migration advisory lock ``key`` in the connection's database, or None."""
    # A bigint advisory key is stored as two 32-bit halves: classid (high) and objid (low).
    with conn.cursor() as cur:
        cur.execute(_HOLDER_SQL, (key >> 32 & 0xFFFFFFFF, key & 0xFFFFFFFF))
        return cur.fetchone()


def _describe_holder(conn, key: int) -> str:
    """Return who holds the advisory lock ``key``, for the timeout message."""
    row = lock_holder(conn, key)
    if row is None:
        return "a session that has just released it"
    pid, app, user, since, client = row
    holder = (f"pid {pid} (application {app!r}, user {user!r} from {client}, "
              f"connected since {since:%Y-%m-%d %H:%M:%S %Z})")
    # The lock has a session of its own; the work runs in a second one, named alike.
    if not app.startswith("dbmigrate lock: "):
        return holder
    with conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s",
                    (app.replace("dbmigrate lock: ", "dbmigrate ", 1),))
        workers = [str(r[0]) for r in cur.fetchall()]
    if workers:
        holder += f" with its work session pid {', '.join(workers)}"
    return holder


@contextmanager
def migration_lock(target: Target, settings: Settings, purpose: str = "apply") -> Iterator[None]:
    """Hold the database's migration advisory lock for the block; raise MigrationLockTimeout."""
    key = settings.advisory_lock_key
    deadline = time.monotonic() + settings.advisory_lock_wait
    # Closing the session releases the lock even if the unlock cannot be sent.
    with raw_session(target, f"dbmigrate lock: {purpose}") as conn:
        with conn.cursor() as cur:
            # an idle lock session must not be closed under the apply by a server-wide timeout
            cur.execute("SELECT set_config('idle_session_timeout', '0', false)")
            while True:
                cur.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                if cur.fetchone()[0]:
                    break
                if time.monotonic() >= deadline:
                    holder = _describe_holder(conn, key)
                    raise MigrationLockTimeout(
                        f"another migration run holds the lock on database {target.dbname!r}: "
                        f"{holder}; waited {settings.advisory_lock_wait:g}s. Let it finish and run "
                        "again; if that process is gone for good, end its sessions with "
                        "SELECT pg_terminate_backend(pid) for each pid named here"
                    )
                time.sleep(POLL_SECONDS)
        log.debug("migration lock %s taken on %s", key, target.masked_url)
        yield


def configure_session(db: peewee.Database, settings: Settings) -> None:
    """Set the timeouts of a migration session: short lock waits, bounded statements, bounded idling.

    In a child process (dbcore.sandbox) its backend pid is reported to the parent, which ends
    the session at the deadline.
    """
    report_backend(db.connection().info.backend_pid)
    for name, value in (
        ("lock_timeout", settings.lock_timeout),
        ("statement_timeout", settings.statement_timeout),
        # Python-side waiting inside the batch (a sleep, a slow loop) holds the table locks too
        ("idle_in_transaction_session_timeout", settings.idle_in_transaction_timeout),
        # a killed client's statement would otherwise run on, holding its locks, until it ends
        ("client_connection_check_interval", "500ms"),
    ):
        db.execute_sql("SELECT set_config(%s, %s, false)", (name, value))
