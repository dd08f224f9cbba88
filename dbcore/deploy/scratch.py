"""Where the rehearsal copy is made, how, and what a crashed run left there.

The copy never lands on the production cluster unless asked: ``MIGRATE_REHEARSAL_DATABASE_URL``
names the server (its maintenance database); without it the local environment uses the target's
own cluster (copied with ``CREATE DATABASE ... TEMPLATE`` when nobody else is connected to the
source), the proxy environment the laptop's embedded cluster (never through the tunnel), and
production refuses unless ``MIGRATE_REHEARSAL_ON_TARGET=1``.

A run claims its scratch name with an advisory lock on the server's maintenance database for as
long as the copy exists. A scratch database whose claim is free and which no session uses was
left by a run that died: the next run drops it, and says so.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

import psycopg2
from psycopg2 import errorcodes, sql

from dbcore.connection import Env, Target, connect_raw, raw_session
from dbcore.errors import ConfigError, RehearsalFailed
from dbcore.redact import error_line
from dbcore.settings import Settings

log = logging.getLogger(__name__)

SCRATCH_INFIX = "_rehearsal_"
#: first key of the two-int advisory locks that claim scratch names ("DMRE")
_CLAIM_CLASS = 0x444D5245


def derived_name(dbname: str, suffix: str) -> str:
    """Return ``dbname`` cut to fit ``suffix`` within PostgreSQL's 63 bytes (never mid-character)."""
    room = 63 - len(suffix.encode())
    head = dbname.encode()[:room].decode(errors="ignore")
    return head + suffix


def scratch_name(dbname: str, run_id: str) -> str:
    """Return the scratch database name of ``run_id`` for ``dbname`` (at most 63 bytes)."""
    tag = run_id[:8].lower()
    if not re.fullmatch(r"[0-9a-f]{8}", tag):  # a CI job id, a ticket: made hex like the rest
        tag = hashlib.sha256(run_id.encode()).hexdigest()[:8]
    return derived_name(dbname, f"{SCRATCH_INFIX}{tag}")


def scratch_pattern(dbname: str) -> re.Pattern[str]:
    """Return the pattern of every scratch name this product makes for ``dbname``."""
    head = derived_name(dbname, f"{SCRATCH_INFIX}00000000")[: -len(SCRATCH_INFIX) - 8]
    return re.compile(re.escape(head) + re.escape(SCRATCH_INFIX) + r"[0-9a-f]{8}")


def _host_port(target: Target) -> str:
    parts = urlsplit(target.url)
    return f"{parts.hostname or 'local socket'}:{parts.port or 5432}"


@dataclass(frozen=True)
class RehearsalServer:
    """The server the rehearsal copy is made on: its maintenance database and how it was chosen."""

    admin: Target  # the maintenance database; scratch copies are made beside it
    where: str  # for the plan: which server and why
    on_target: bool  # the target's own cluster

    def scratch(self, dbname: str) -> Target:
        return self.admin.with_dbname(dbname)


def rehearsal_server(target: Target, settings: Settings, local_cluster_url: str | None = None, *,
                     start_local: Callable[[Settings], str] | None = None) -> RehearsalServer:
    """Return where the rehearsal of ``target`` runs; raise ConfigError when nowhere is allowed.

    ``local_cluster_url`` is the laptop's embedded cluster, which the caller (the flow or the
    CLI) starts for the proxy environment: given ``start_local`` instead, it is started (and its
    URL read) only when the proxy environment needs it.
    """
    if (target.env is Env.PROXY and local_cluster_url is None and start_local is not None
            and settings.rehearsal_database_url is None):
        local_cluster_url = start_local(settings)
    if settings.rehearsal_database_url is not None:
        url = settings.rehearsal_database_url.get_secret_value()
        if not url.startswith(("postgres://", "postgresql://")):
            raise ConfigError("MIGRATE_REHEARSAL_DATABASE_URL is not a postgres:// URL: use "
                              "postgres://USER:PASSWORD@HOST:PORT/postgres")
        # another server: the target's roles need not exist there (restored without owners)
        admin = Target(Env.LOCAL, url)
        return RehearsalServer(admin, f"MIGRATE_REHEARSAL_DATABASE_URL ({_host_port(admin)})",
                               False)
    if target.env is Env.LOCAL:
        return RehearsalServer(target.with_dbname("postgres"),
                               f"the target's own cluster ({_host_port(target)}, local)", True)
    if target.env is Env.PROXY:
        if not local_cluster_url:
            raise ConfigError("the proxy environment rehearses on the laptop's embedded cluster "
                              "and none was given: run `python -m dbcore.services up`, or set "
                              "MIGRATE_REHEARSAL_DATABASE_URL")
        admin = Target(Env.LOCAL, local_cluster_url)
        return RehearsalServer(admin, f"the embedded local cluster ({_host_port(admin)}), "
                                      "not through the tunnel", False)
    if settings.rehearsal_on_target:
        return RehearsalServer(target.with_dbname("postgres"),
                               "the production cluster itself (MIGRATE_REHEARSAL_ON_TARGET=1)", True)
    raise ConfigError(
        "production rehearses on a copy on another server: set MIGRATE_REHEARSAL_DATABASE_URL "
        "to its maintenance database (postgres://USER:PASSWORD@HOST:PORT/postgres), or "
        "MIGRATE_REHEARSAL_ON_TARGET=1 to make the copy on the production cluster itself")


def _system_identifier(target: Target) -> int | None:
    with raw_session(target, "dbmigrate rehearsal: which cluster") as conn:
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT system_identifier FROM pg_control_system()")
                return int(cur.fetchone()[0])
        except psycopg2.Error:
            return None  # cannot tell (a managed server may hide it)


def refuse_the_target_cluster(server: RehearsalServer, target: Target) -> None:
    """Raise RehearsalFailed when a server named for the rehearsal is the live cluster itself.

    Only outside the local environment, and unless MIGRATE_REHEARSAL_ON_TARGET=1 chose it: the
    same cluster under another address (a tunnel, a second DNS name) is recognised by its
    system identifier.
    """
    if server.on_target or target.env is Env.LOCAL:
        return
    mine = _system_identifier(server.admin)
    if mine is not None and mine == _system_identifier(target):
        raise RehearsalFailed(
            f"{server.where} is the {target.env} cluster itself (same system identifier): the "
            "copy would double its disk use and load it during the deploy; set "
            "MIGRATE_REHEARSAL_DATABASE_URL to another server, or MIGRATE_REHEARSAL_ON_TARGET=1 "
            "to accept that")


def _try_claim(cur, dbname: str) -> bool:
    cur.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))", (_CLAIM_CLASS, dbname))
    return bool(cur.fetchone()[0])


def _release(cur, dbname: str) -> None:
    cur.execute("SELECT pg_advisory_unlock(%s, hashtext(%s))", (_CLAIM_CLASS, dbname))


def claim(server: RehearsalServer, dbname: str):
    """Return a session of ``server`` holding the claim on scratch name ``dbname`` (closing it
    releases the claim); raise RehearsalFailed if another run holds it."""
    conn = connect_raw(server.admin, f"dbmigrate rehearsal: {dbname}"[:63])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT set_config('idle_session_timeout', '0', false)")
            if not _try_claim(cur, dbname):
                raise RehearsalFailed(f"another run is rehearsing in {dbname}: wait for it to end")
    except BaseException:
        conn.close()
        raise
    return conn


@dataclass(frozen=True)
class Leftovers:
    """Scratch databases of earlier runs found at the start of a rehearsal."""

    dropped: tuple[str, ...] = ()
    kept: tuple[tuple[str, str], ...] = field(default=())  # (name, why it was kept)

    def to_dict(self) -> dict:
        return {"dropped": list(self.dropped), "kept": [list(k) for k in self.kept]}


def drop_leftovers(server: RehearsalServer, dbname: str) -> Leftovers:
    """Drop the scratch databases of ``dbname`` that runs which died left on ``server``.

    Only names this product makes, only when no run claims them and no session uses them.
    """
    pattern = scratch_pattern(dbname)
    dropped, kept = [], []
    with raw_session(server.admin, "dbmigrate rehearsal: leftovers") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT datname FROM pg_database WHERE NOT datistemplate ORDER BY datname")
            names = [row[0] for row in cur.fetchall() if pattern.fullmatch(row[0])]
            for name in names:
                if not _try_claim(cur, name):
                    kept.append((name, "a running rehearsal uses it"))
                    continue
                try:
                    cur.execute("SELECT pid, coalesce(application_name, '') FROM pg_stat_activity "
                                "WHERE datname = %s", (name,))
                    sessions = cur.fetchall()
                    if sessions:
                        kept.append((name, "in use by " + ", ".join(
                            f"pid {pid} ({app or 'no application name'})" for pid, app in sessions)))
                        continue
                    try:  # no FORCE: a session that connected meanwhile keeps it
                        cur.execute(sql.SQL("DROP DATABASE {}").format(sql.Identifier(name)))
                    except psycopg2.Error as exc:
                        kept.append((name, error_line(exc, server.admin.password)))
                        continue
                    dropped.append(name)
                    log.warning("dropped scratch database %s on %s: a rehearsal that did not "
                                "finish left it", name, server.where)
                finally:
                    _release(cur, name)
    for name, why in kept:
        log.warning("left scratch database %s on %s in place: %s", name, server.where, why)
    return Leftovers(tuple(dropped), tuple(kept))


def copy_with_template(server: RehearsalServer, source: str, dbname: str) -> bool:
    """Create ``dbname`` as a copy of ``source`` with CREATE DATABASE ... TEMPLATE.

    Returns False, having changed nothing, when another session is connected to ``source``
    (PostgreSQL then refuses the copy) or PostgreSQL refuses it for another reason (a role that
    may not copy that database): the caller restores the backup instead.
    """
    with raw_session(server.admin, "dbmigrate rehearsal: copy") as conn:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (source,))
            if cur.fetchone()[0]:
                return False  # PostgreSQL would wait 5 s and then refuse
            try:
                cur.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                    sql.Identifier(dbname), sql.Identifier(source)))
            except psycopg2.Error as exc:
                if exc.pgcode != errorcodes.OBJECT_IN_USE:  # else: a session connected meanwhile
                    log.info("no TEMPLATE copy of %s (%s): restoring the backup instead", source,
                             error_line(exc, server.admin.password))
                return False
    return True


def create_database(server: RehearsalServer, dbname: str) -> None:
    """Create the empty scratch database ``dbname`` from the server's maintenance database (which
    need not be called postgres on a managed server); raise RehearsalFailed."""
    with raw_session(server.admin, "dbmigrate rehearsal: create") as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
        except psycopg2.Error as exc:
            raise RehearsalFailed(f"cannot create the scratch database {dbname} on {server.where}: "
                                  f"{error_line(exc, server.admin.password)}: the user needs CREATEDB "
                                  "there") from None


def drop_database(server: RehearsalServer, dbname: str) -> None:
    """Drop scratch database ``dbname`` on ``server``, ending its sessions; raise RehearsalFailed.

    Only a name this product made for scratch copies: never the live database, never another.
    """
    if SCRATCH_INFIX not in dbname:
        raise RehearsalFailed(f"refusing to drop {dbname}: it is not a scratch database")
    with raw_session(server.admin, "dbmigrate rehearsal: drop") as conn:
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(dbname)))
        except psycopg2.Error as exc:
            raise RehearsalFailed(f"could not drop the scratch database {dbname}: "
                                  f"{error_line(exc, server.admin.password)}: drop it by hand") from None
