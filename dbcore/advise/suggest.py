"""`dbmigrate suggest-indexes` as one call: read the workload, make a copy, prove, drop the copy.

The target is only read (pg_stat_statements, the tables' write statistics). The proof runs on a
copy on the rehearsal server (dbcore.deploy.scratch decides where; never production's cluster
unless MIGRATE_REHEARSAL_ON_TARGET=1): locally a ``CREATE DATABASE ... TEMPLATE`` copy, else the
newest backup (or ``backup_key``) restored there. ``copy_url`` names a copy that already exists
(a staging restore): it is VACUUM ANALYZEd and used as it is.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import peewee
import psycopg2

from dbcore.advise.prove import Advice, advise, prepare_copy, write_costs
from dbcore.advise.workload import Workload, from_app, from_file, from_pg_stat_statements, merged
from dbcore.backup.dump import list_backups
from dbcore.connection import Env, Target, raw_session
from dbcore.deploy.rehearsal import ScratchCopy, restore_into_copy
from dbcore.deploy.scratch import (
    RehearsalServer,
    claim,
    copy_with_template,
    drop_leftovers,
    refuse_the_target_cluster,
    scratch_name,
)
from dbcore.errors import ConfigError
from dbcore.settings import Settings

NO_QUERIES = ("no queries to propose indexes for: pg_stat_statements is not installed in the "
              "target database (add it to shared_preload_libraries and CREATE EXTENSION "
              "pg_stat_statements), so pass --queries FILE (a slow-query log) or --app PATH")


def read_workload(target: Target, *, queries_file: Path | None = None, app: Path | None = None,
                  models: list[type[peewee.Model]] | None = None) -> Workload:
    """Return the queries to advise on; raise ConfigError when there are none."""
    if app is not None and not models:
        raise ConfigError("--app reads Peewee queries by their models: set MIGRATE_MODELS to the "
                          "app's module:LIST")
    recorded = from_pg_stat_statements(target)
    workload = merged(recorded,
                      from_file(queries_file) if queries_file else None,
                      from_app(app, models) if app is not None and models else None)
    if not workload.queries:
        if recorded is None and queries_file is None and app is None:
            raise ConfigError(NO_QUERIES)
        raise ConfigError("no SELECT, UPDATE or DELETE on the app's tables in the queries read: "
                          "nothing to propose indexes for")
    if recorded is None:
        workload = Workload(workload.queries, workload.total_ms,
                            workload.notes + ("pg_stat_statements is not installed on the target: "
                                              "no query has a share of the time",))
    return workload


def _same_database(a: Target, b: Target) -> bool:
    """True when ``a`` and ``b`` are one database: the same address, or the same name on the same
    cluster under another address (a tunnel, a second DNS name: its system identifier)."""
    pa, pb = urlsplit(a.url), urlsplit(b.url)
    if (pa.hostname, pa.port or 5432, a.dbname) == (pb.hostname, pb.port or 5432, b.dbname):
        return True
    return a.dbname == b.dbname and _cluster(a) is not None and _cluster(a) == _cluster(b)


def _cluster(target: Target) -> int | None:
    with raw_session(target, "dbmigrate suggest-indexes") as conn, conn.cursor() as cur:
        try:
            cur.execute("SELECT system_identifier FROM pg_control_system()")
            return int(cur.fetchone()[0])
        except psycopg2.Error:
            return None  # cannot tell (a managed server may hide it)


def make_copy(target: Target, server: RehearsalServer, settings: Settings, run_id: str,
              backup_key: str | None = None) -> ScratchCopy:
    """Return a claimed scratch copy of ``target`` on ``server`` (the caller discards it)."""
    refuse_the_target_cluster(server, target)
    if server.on_target and target.env is Env.LOCAL and backup_key is None:
        leftovers = drop_leftovers(server, target.dbname)
        scratch = server.scratch(scratch_name(target.dbname, run_id))
        holder = claim(server, scratch.dbname)
        started = time.monotonic()
        if copy_with_template(server, target.dbname, scratch.dbname):
            return ScratchCopy(server, scratch, "template", round(time.monotonic() - started, 3),
                               leftovers, holder)
        holder.close()
    if backup_key is None:
        if not settings.s3_bucket:
            raise ConfigError("no copy to prove indexes on: the local copy needs nobody else "
                              "connected to the target, other targets a backup (set MIGRATE_S3_BUCKET "
                              "and run `dbmigrate backup`), or pass --copy-url of a copy")
        backups = list_backups(settings, database=target.dbname, env=str(target.env))
        if not backups:
            raise ConfigError(f"no backup of {target.dbname} to make the copy from: run "
                              "`dbmigrate backup` first, or pass --copy-url of a copy")
        backup_key = backups[0].key
    return restore_into_copy(target, server, settings, run_id, backup_key)


def suggest_indexes(target: Target, settings: Settings, *, server: RehearsalServer | None = None,
                    copy_url: str | None = None, backup_key: str | None = None,
                    queries_file: Path | None = None, app: Path | None = None,
                    models: list[type[peewee.Model]] | None = None,
                    margin: float | None = None, run_id: str | None = None) -> Advice:
    """Return the index proposals for ``target``'s workload, proven on a copy; the target is only read."""
    margin = settings.index_min_saving / 100.0 if margin is None else margin
    workload = read_workload(target, queries_file=queries_file, app=app, models=models)
    writes = write_costs(target)
    if copy_url:
        copy = Target(Env.LOCAL, copy_url)
        if _same_database(copy, target):
            raise ConfigError("--copy-url is the target itself: indexes are proven on a copy, "
                              "never on the live database; give the URL of a copy")
        prepare_copy(copy, "the copy given by --copy-url")
        return advise(workload, copy, margin=margin, writes=writes)
    if server is None:
        raise ConfigError("no rehearsal server to make the copy on: set "
                          "MIGRATE_REHEARSAL_DATABASE_URL or pass --copy-url")
    scratch = make_copy(target, server, settings, run_id or uuid.uuid4().hex, backup_key)
    try:
        prepare_copy(scratch.target, server.where)
        advice = advise(workload, scratch.target, margin=margin, writes=writes)
        advice.notes.append(f"proven on a copy on {server.where} ({scratch.method})")
        return advice
    finally:
        scratch.discard()

