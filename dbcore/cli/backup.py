"""``dbmigrate backup | backups | verify | restore | prune``: the backup sub-commands.

Results go to stdout; the progress bar goes to stderr, and only when stderr is a terminal.
"""

from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from dbcore.backup.dump import backup_to_s3, list_backups, prune_backups
from dbcore.backup.restore import verify_backup
from dbcore.cli.context import Context, positive_int
from dbcore.connection import Target, resolve_target
from dbcore.deploy.verdict import size_text


@contextmanager
def progress_bar(description: str, total: int | None = None) -> Iterator[Callable[[int], None] | None]:
    """Yield a bytes-so-far callback drawing a bar on stderr, or None when stderr is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TransferSpeedColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda done: bar.update(task, completed=done)


def cmd_backup(ctx: Context) -> int:
    """Back the target database up to S3; print key, size and sha256."""
    # pg_dump's output size is unknown beforehand: the bar shows bytes dumped and speed
    with progress_bar(f"backing up {ctx.target.dbname}") as progress:
        info = backup_to_s3(ctx.target, ctx.settings, progress=progress)
    if ctx.args.json:
        print(json.dumps(info.to_dict()))
    else:
        print(f"key:    {info.key}")
        print(f"size:   {info.size} ({size_text(info.size)}, {info.compression})")
        print(f"sha256: {info.sha256}")
    return 0


def cmd_backups(ctx: Context) -> int:
    """List stored backups, newest first."""
    backups = list_backups(ctx.settings, database=ctx.args.database)
    if ctx.args.json:
        print(json.dumps([b.to_dict() for b in backups], indent=2))
        return 0
    if not backups:
        print("no backups")
        return 0
    for b in backups:
        print(f"{b.created_at:%Y-%m-%d %H:%M:%S}  {b.env:10} {b.database:20} {size_text(b.size):>10}  "
              f"{b.last_migration:30} {b.key}")
    return 0


def cmd_verify(ctx: Context) -> int:
    """Download a backup, check its checksum and read it with pg_restore."""
    with progress_bar("verifying") as progress:
        report = verify_backup(ctx.args.key, ctx.settings, progress=progress)
    print(f"ok: {report.key}: sha256 {report.sha256} matches, {report.size} bytes, "
          f"{report.toc_entries} archive entries")
    return 0


def _into(ctx: Context) -> Target:
    """The database named by --into: a URL, or a database name on the target's server."""
    into = ctx.args.into
    if "://" in into:
        return resolve_target(ctx.settings, ctx.args.env, into)
    return ctx.target.with_dbname(into)


def cmd_restore(ctx: Context) -> int:
    """Restore a backup into a database (created if missing)."""
    from dbcore.deploy.policy import restore_guarded  # the live-target policy

    into = _into(ctx)
    with progress_bar(f"restoring into {into.dbname}") as progress:
        done = restore_guarded(ctx.args.key, into, ctx.settings, actor=ctx.args.actor,
                               force=ctx.args.force, allow_production=ctx.args.allow_production,
                               jobs=ctx.args.jobs, progress=progress, run_id=ctx.args.run_id)
    report = done.report
    if ctx.args.json:
        print(json.dumps({**report.to_dict(), "kept_as": done.kept_as}))
    else:
        print(f"restored {report.key} into {report.database} in {report.seconds:.1f}s "
              f"(pg_restore -j {report.jobs})")
        if done.kept_as:
            print(f"the database it replaced is kept as {done.kept_as} (drop it once you are sure)")
    return 0


def cmd_prune(ctx: Context) -> int:
    """Delete all but the N newest backups of each database."""
    deleted = prune_backups(ctx.settings, ctx.args.keep, database=ctx.args.database)
    if ctx.args.json:
        print(json.dumps(deleted))
        return 0
    for key in deleted:
        print(f"deleted {key}")
    print(f"{len(deleted)} backup(s) deleted, the {ctx.args.keep} newest of each database kept")
    return 0


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    """Add the backup sub-commands to ``dbmigrate``."""
    p = sub.add_parser("backup", parents=[common],
                       help="pg_dump the target database, compressed, to S3 (MIGRATE_S3_BUCKET)")
    p.add_argument("--json", action="store_true", help="print one JSON object (key, size, sha256, ...)")
    p.set_defaults(handler=cmd_backup)

    p = sub.add_parser("backups", parents=[common], help="list stored backups, newest first")
    p.add_argument("--database", help="only the backups of this database")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p.set_defaults(handler=cmd_backups)

    p = sub.add_parser("verify", parents=[common],
                       help="download a backup, check its sha256 and read it with pg_restore")
    p.add_argument("key", help="the backup's key, as `dbmigrate backups` prints it")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("restore", parents=[common], help="restore a backup into a database")
    p.add_argument("key", help="the backup's key, as `dbmigrate backups` prints it")
    p.add_argument("--into", required=True, metavar="DBNAME_OR_URL",
                   help="database name on the target's server (created if missing), or a URL")
    p.add_argument("--force", action="store_true", help="overwrite a database that is not empty")
    p.add_argument("--allow-production", action="store_true",
                   help="allow restoring into a production database")
    p.add_argument("--actor", help="who restores (recorded in migration_audit and the backup's "
                                   "metadata); required on production or proxy")
    p.add_argument("--run-id", help="an id to record with the restore")
    p.add_argument("--jobs", "-j", type=positive_int, default=None, help="pg_restore jobs (default: cores, at most 4)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=cmd_restore)

    p = sub.add_parser("prune", parents=[common], help="delete all but the N newest backups per database")
    p.add_argument("--keep", type=int, required=True, metavar="N", help="backups to keep per database")
    p.add_argument("--database", help="only prune this database's backups")
    p.add_argument("--json", action="store_true", help="print the deleted keys as JSON")
    p.set_defaults(handler=cmd_prune)
