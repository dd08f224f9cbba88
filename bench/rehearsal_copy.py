"""Benchmark of the local rehearsal's copy: ``CREATE DATABASE ... TEMPLATE`` against restoring the backup.

Run: ``.venv/bin/python bench/rehearsal_copy.py [--rounds 3] [--size-mb 200]``. It starts its own
PostgreSQL cluster and SeaweedFS server in a temp folder, fills a database as bench/backup.py
does, backs it up once, then times each way of making the scratch copy on the same cluster (what
the rehearsal does in the local environment), and rewrites the "Rehearsal copy" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

from backup import ACCESS_KEY, BUCKET, SECRET_KEY, generate, sql, write_section

from dbcore.backup.dump import backup_to_s3
from dbcore.connection import Env, Target
from dbcore.deploy.rehearsal import ScratchCopy, backup_into_copy, restore_into_copy
from dbcore.deploy.scratch import RehearsalServer, copy_with_template, scratch_name
from dbcore.services.postgres import PostgresCluster
from dbcore.services.seaweed import SeaweedServer
from dbcore.settings import Settings

SECTION = "## Rehearsal copy"
BACKUP_ONLY = "backup alone (no copy)"
STREAM = "backup + copy from its stream (proxy, production, local when busy)"
TEMPLATE_THEN_BACKUP = "TEMPLATE copy, then backup (local, nobody connected)"
TEMPLATE = "copy alone: CREATE DATABASE ... TEMPLATE"
RESTORE = "copy alone: restore of the stored backup (download, pg_restore -j)"



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-copy-"))
    root.chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
    cluster = PostgresCluster(root / "pg")
    s3 = SeaweedServer(root / "s3", ACCESS_KEY, SECRET_KEY)
    try:
        cluster.init()
        cluster.start(fast=True)
        s3.start()
        s3.create_bucket(BUCKET)
        os.environ.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                          AWS_DEFAULT_REGION="us-east-1")
        sql(cluster.url("postgres"), "CREATE DATABASE app")
        size = generate(cluster.url("app"), args.size_mb)
        settings = Settings(s3_bucket=BUCKET, s3_endpoint_url=s3.endpoint_url,
                            local_dir=root / ".local")
        target = Target(Env.LOCAL, cluster.url("app"))
        server = RehearsalServer(target.with_dbname("postgres"), "bench", True)
        info = backup_to_s3(target, settings)

        def timed_copy(make) -> float:
            os.sync()
            started = time.perf_counter()
            copy = make()
            seconds = time.perf_counter() - started
            if copy is not None:
                copy.discard()
            return seconds

        def template_alone() -> ScratchCopy:
            name = scratch_name("app", uuid.uuid4().hex)
            assert copy_with_template(server, "app", name)
            return ScratchCopy(server, server.scratch(name), "template", 0.0)

        ways = {
            BACKUP_ONLY: lambda: backup_to_s3(target, settings) and None,
            STREAM: lambda: backup_into_copy(target, server, settings, uuid.uuid4().hex,
                                             template=False)[1],
            TEMPLATE_THEN_BACKUP: lambda: backup_into_copy(target, server, settings,
                                                           uuid.uuid4().hex)[1],
            TEMPLATE: template_alone,
            RESTORE: lambda: restore_into_copy(target, server, settings, uuid.uuid4().hex, info.key),
        }
        times: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, make in ways.items():
                times[name].append(timed_copy(make))
        report = render(args, size, times)
        print(report)
        if not args.no_write:
            write_section(report, SECTION)
        return 0
    finally:
        s3.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def render(args, size: int, times: dict[str, list[float]]) -> str:
    med = {name: statistics.median(values) for name, values in times.items()}
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [SECTION, "",
             f"`.venv/bin/python bench/rehearsal_copy.py --rounds {args.rounds} --size-mb "
             f"{args.size_mb}`, {when}, {os.cpu_count()} cores, {platform.system()} "
             f"{platform.release()}, PostgreSQL 15 (fsync off), SeaweedFS on 127.0.0.1. Database: "
             f"{size / 2**20:.0f} MB (`pg_database_size`), as bench/backup.py fills it, copied on "
             f"its own cluster. Load average (1 min) at the end: {os.getloadavg()[0]:.2f}. "
             f"{args.note}".rstrip(), "",
             "| way | median s | vs the backup alone | rounds (s) |", "|---|---:|---:|---|"]
    for name, values in times.items():
        lines.append(f"| {name} | {med[name]:.2f} | {med[name] / med[BACKUP_ONLY]:.2f}x | "
                     f"{', '.join(f'{v:.2f}' for v in values)} |")
    lines += ["", f"TEMPLATE against a restore of the stored backup: {med[TEMPLATE]:.2f} s vs "
              f"{med[RESTORE]:.2f} s ({med[TEMPLATE] / med[RESTORE]:.2f}x). The local rehearsal uses "
              "the TEMPLATE copy when no other session is connected to the target (PostgreSQL "
              "refuses it otherwise, after waiting 5 s: the rehearsal checks first), else the copy "
              "from the backup's stream. A TEMPLATE copy does not prove that the backup restores; "
              "in the proxy and production environments the copy is always the backup's stream "
              "restored on another server.", ""]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
