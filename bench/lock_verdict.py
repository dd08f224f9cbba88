"""Benchmark of the lock verdict: the write-block time it predicts on a copy against the blocking
the application meets on the live apply.

Run: ``.venv/bin/python bench/lock_verdict.py [--size-mb 1000] [--rate 100]``. It starts its own
private PostgreSQL cluster (copy and live database on one server) and fills ``document`` to about
``--size-mb`` (plus ``author``, 1000 rows). For each change: a copy (``CREATE DATABASE ...
TEMPLATE``) is migrated with the rehearsal's meter and judged (what it predicts: the window in
which the table's writes are blocked, and the reading rewrite / scan / none); then another copy,
the "live" one, is migrated by the plain runner while pgbench writes to it (4 clients at a fixed
``--rate``: an UPDATE by primary key of ``document``, and of ``author``). Observed = the longest
pgbench write to the table while the apply ran (its time, without schedule lag). It prints the
side-by-side table and rewrites the "Lock verdict" section of bench/RESULTS.md (others are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from backup import REPO, sql, write_section  # bench/backup.py: same cluster helpers and RESULTS.md

from dbcore.connection import Env, Target
from dbcore.deploy.locks import execute_measured
from dbcore.deploy.verdict import judge
from dbcore.migrate.plan import plan_apply
from dbcore.migrate.runner import execute
from dbcore.services.postgres import PostgresCluster, find_pg_bindir
from dbcore.settings import Settings

SECTION = "## Lock verdict"
APPLY_AT = 2.0  # seconds of pgbench before the apply
AFTER = 1.5  # seconds of pgbench after it
WORKLOAD_DOCUMENT = """\\set id random(1, {rows})
UPDATE document SET hits = hits + 1 WHERE id = :id;
"""
WORKLOAD_AUTHOR = """\\set id random(1, 1000)
UPDATE author SET hits = hits + 1 WHERE id = :id;
"""


@dataclass(frozen=True)
class Change:
    name: str
    migrations: tuple[tuple[str, tuple[str, ...]], ...]  # (file name, statements)
    table: str  # the table whose writes are judged
    expected: str  # rewrite, scan or none
    atomic: bool = True


CHANGES = [
    Change("ADD COLUMN nullable", (("001_c", ("ALTER TABLE document ADD COLUMN note text",)),),
           "document", "none"),
    Change("ADD COLUMN constant default",
           (("001_c", ("ALTER TABLE document ADD COLUMN flag int NOT NULL DEFAULT 0",)),),
           "document", "none"),
    Change("ADD COLUMN DEFAULT gen_random_uuid()",
           (("001_c", ("ALTER TABLE document ADD COLUMN token uuid DEFAULT gen_random_uuid()",)),),
           "document", "rewrite"),
    Change("ALTER COLUMN TYPE int -> bigint",
           (("001_c", ("ALTER TABLE document ALTER COLUMN n TYPE bigint",)),), "document", "rewrite"),
    Change("varchar(20) -> text", (("001_c", ("ALTER TABLE document ALTER COLUMN s TYPE text",)),),
           "document", "none"),
    Change("SET NOT NULL", (("001_c", ("ALTER TABLE document ALTER COLUMN n SET NOT NULL",)),),
           "document", "scan"),
    Change("ADD FOREIGN KEY (validated)",
           (("001_c", ("ALTER TABLE document ADD CONSTRAINT document_author_fk FOREIGN KEY "
                       "(author_id) REFERENCES author (id)",)),), "document", "scan"),
    Change("CREATE INDEX", (("001_c", ("CREATE INDEX document_n ON document (n)",)),),
           "document", "scan"),
    Change("CREATE INDEX CONCURRENTLY (atomic = False)",
           (("001_c", ("DROP INDEX CONCURRENTLY IF EXISTS document_n",
                       "CREATE INDEX CONCURRENTLY document_n ON document (n)")),),
           "document", "scan", atomic=False),
    Change("batch: fast ALTER on author, then int -> bigint on document",
           (("001_a", ("ALTER TABLE author ADD COLUMN note text",)),
            ("002_d", ("ALTER TABLE document ALTER COLUMN n TYPE bigint",))), "author", "none"),
]


@dataclass(frozen=True)
class Row:
    change: Change
    blocks: str
    predicted: float  # seconds the verdict says the table's writes are blocked (0: not blocked)
    window: float  # the verdict's window, whatever it blocks
    reading: str
    observed: float  # the longest pgbench write to the table during the live apply, seconds
    apply_seconds: float
    writes: int  # pgbench writes to the table during the apply window

    @property
    def reading_ok(self) -> bool:
        return self.reading == self.change.expected

    @property
    def within(self) -> bool:
        return abs(self.predicted - self.observed) <= max(0.3 * self.observed, 0.5)


def write_migrations(folder: Path, change: Change) -> None:
    folder.mkdir(parents=True)
    for name, statements in change.migrations:
        body = "\n".join(f"    migrator.sql({s!r})" for s in statements)
        head = "" if change.atomic else "atomic = False\n\n"
        (folder / f"{name}.py").write_text(head + textwrap.dedent("""\
            def migrate(migrator, database, *, fake=False):
            """) + body + "\n\n\ndef rollback(migrator, database, *, fake=False):\n    pass\n")


def clone(cluster: PostgresCluster, name: str) -> Target:
    """Copy the seed; write it out and read the table once, so that copy and live start alike."""
    sql(cluster.url("postgres"), f"CREATE DATABASE {name} TEMPLATE seed")
    sql(cluster.url(name), "CHECKPOINT")
    sql(cluster.url(name), "SELECT count(*) FROM document")
    return Target(Env.LOCAL, cluster.url(name))


def drop(cluster: PostgresCluster, name: str) -> None:
    sql(cluster.url("postgres"), f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def pgbench_writes(log_dir: Path, script: int, start: float, end: float) -> list[float]:
    """Return the times (s) of the writes of ``script`` that were running during [start, end]."""
    found = []
    for path in log_dir.glob("txn*"):
        for line in path.read_text().splitlines():
            fields = line.split()
            if len(fields) < 6 or int(fields[3]) != script:
                continue
            elapsed = int(fields[2]) / 1e6
            done = int(fields[4]) + int(fields[5]) / 1e6
            if done >= start and done - elapsed <= end:
                found.append(elapsed)
    return found


def run_change(cluster: PostgresCluster, change: Change, n: int, root: Path, args) -> Row:
    work = root / f"c{n}"
    write_migrations(work / "migrations", change)
    settings = Settings(migrations_dir=work / "migrations", lock_timeout="5s",
                        statement_timeout="30min", local_dir=work / ".local")
    # the rehearsal: on a copy, measured and judged
    copy = clone(cluster, f"copy{n}")
    try:
        _, measured = execute_measured(plan_apply(copy, settings), copy, settings, actor="bench")
    finally:
        drop(cluster, f"copy{n}")
    verdict = judge(measured, budget=5.0, files={})
    line = next(v for v in verdict.tables if v.table == change.table)
    predicted = line.seconds if line.blocks_writes else 0.0
    print(f"  predicted: {line.line()}", file=sys.stderr)
    # the live apply, under pgbench writes
    live = clone(cluster, f"live{n}")
    (work / "document.sql").write_text(WORKLOAD_DOCUMENT.format(rows=args.rows))
    (work / "author.sql").write_text(WORKLOAD_AUTHOR)
    seconds = int(APPLY_AT + AFTER + 4 * max(line.seconds, 1.0) + 10)
    pgbench = subprocess.Popen(
        [str(find_pg_bindir("pgbench") / "pgbench"), "--no-vacuum", "--client=4", "--jobs=2",
         f"--time={seconds}", f"--rate={args.rate}", "--log", f"--log-prefix={work}/txn",
         f"--file={work / 'document.sql'}@1", f"--file={work / 'author.sql'}@1", live.url],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=work)
    try:
        time.sleep(APPLY_AT)
        apply_start = time.time()
        execute(plan_apply(live, settings), live, settings, actor="bench")
        apply_end = time.time()
        time.sleep(AFTER)
    finally:
        pgbench.terminate()
        pgbench.communicate(timeout=60)
        drop(cluster, f"live{n}")
    script = 0 if change.table == "document" else 1
    writes = pgbench_writes(work, script, apply_start, apply_end)
    return Row(change, line.blocks, round(predicted, 2), round(line.seconds, 2),
               line.reading, round(max(writes, default=0.0), 2), round(apply_end - apply_start, 2),
               len(writes))


def median_row(rows: list[Row]) -> Row:
    """The median of each figure over the rounds of one change (the reading: the commonest)."""
    def med(name: str) -> float:
        return round(statistics.median(getattr(r, name) for r in rows), 2)

    readings = [r.reading for r in rows]
    return Row(rows[0].change, rows[0].blocks, med("predicted"), med("window"),
               max(set(readings), key=readings.count), med("observed"), med("apply_seconds"),
               int(med("writes")))


def render(args, rows: list[Row], size: str, load: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION, "",
        f"`.venv/bin/python bench/lock_verdict.py --size-mb {args.size_mb} --rate {args.rate} "
        f"--rounds {args.rounds}`, "
        f"{when}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, PostgreSQL 15 "
        f"(fsync off), copy and live database on one server. `document`: {size}; `author`: 1000 "
        f"rows. pgbench: 4 clients, {args.rate} writes/s in all (UPDATE by primary key, half on "
        "`document`, half on `author`). Predicted = the verdict's write-block window measured on "
        "an idle copy (0 when the lock blocks no write); observed = the longest pgbench write to "
        "the table while the live apply ran. Target: the reading right, and predicted within "
        f"max(30%, 0.5 s) of observed. Medians of {args.rounds} round(s); each copy is written "
        f"out (CHECKPOINT) and its table read once before it is migrated. {load}", "",
        "| change | table | blocks | reading (expected) | predicted s | observed s | apply s | "
        "writes seen | within |",
        "|---|---|---|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mark = "" if r.reading_ok else " **WRONG**"
        lines.append(f"| {r.change.name} | {r.change.table} | {r.blocks} | {r.reading} "
                     f"({r.change.expected}){mark} | {r.predicted:.2f} | {r.observed:.2f} | "
                     f"{r.apply_seconds:.2f} | {r.writes} | {'yes' if r.within else 'NO'} |")
    readings = sum(r.reading_ok for r in rows)
    within = sum(r.within for r in rows)
    lines += ["", f"Readings right: {readings} of {len(rows)}; predicted within max(30%, 0.5 s): "
                  f"{within} of {len(rows)}.", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", help="run only the changes whose name contains this")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args(argv)
    args.rows = max(1000, args.size_mb * 1_000_000 // 200)  # about 200 bytes a row
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-verdict-"))
    root.chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
    cluster = PostgresCluster(root / "pg")
    try:
        cluster.init()
        cluster.start(fast=True)
        sql(cluster.url("postgres"), "CREATE DATABASE seed")
        started = time.monotonic()
        sql(cluster.url("seed"), "CREATE TABLE author (id int PRIMARY KEY, name text, hits int "
                                 "NOT NULL DEFAULT 0); INSERT INTO author (id, name) SELECT g, "
                                 "'a' || g FROM generate_series(1, 1000) g")
        sql(cluster.url("seed"), f"CREATE TABLE document AS SELECT g AS id, g AS n, "
                                 f"('x' || g)::varchar(20) AS s, 1 + g % 1000 AS author_id, "
                                 f"0 AS hits, repeat('p', 140) AS body "
                                 f"FROM generate_series(1, {args.rows}) g; "
                                 "ALTER TABLE document ADD PRIMARY KEY (id)")
        sql(cluster.url("seed"), "VACUUM ANALYZE")
        size = sql(cluster.url("seed"), "SELECT pg_size_pretty(pg_table_size('document')), "
                                        "pg_size_pretty(pg_total_relation_size('document'))")[0]
        size_text = (f"{args.rows:,} rows, {size[0]} ({size[1]} with its primary key), made in "
                     f"{time.monotonic() - started:.0f} s")
        print(f"document: {size_text}", file=sys.stderr)
        load_before = os.getloadavg()[0]
        rows = []
        for n, change in enumerate(CHANGES, 1):
            if args.only and args.only not in change.name:
                continue
            print(f"{change.name}", file=sys.stderr)
            rounds = []
            for r in range(args.rounds):
                rounds.append(run_change(cluster, change, n * 100 + r, root, args))
                print(f"  {rounds[-1]}", file=sys.stderr)
            rows.append(median_row(rounds))
        load = (f"Load average (1 min) before / after: {load_before:.2f} / "
                f"{os.getloadavg()[0]:.2f}. {args.note}").strip()
        report = render(args, rows, size_text, load)
        print(report)
        if not args.no_write and not args.only:
            write_section(report, SECTION)
            print(f"written to {(REPO / 'bench' / 'RESULTS.md').relative_to(REPO)}", file=sys.stderr)
        return 0
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
