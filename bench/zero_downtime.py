"""Benchmark: what the application's writes see while a risky change is applied, peewee-migrate's
plain form (``pw_migrate migrate``) against this product's safe forms (``dbmigrate apply``).

Run: ``.venv/bin/python bench/zero_downtime.py [--rows 2000000] [--rate 200] [--rounds 1]``. It
starts its own private PostgreSQL cluster and fills ``accounts`` (``--rows`` rows of about 120
bytes: 2M rows is about 300 MB with its primary key) and ``owner`` (1000 rows). For each change it
copies that database twice (``CREATE DATABASE ... TEMPLATE``) and applies the same migration file
to one with pw_migrate and to the other with dbmigrate, while a write load runs: 4 clients, each
with its own connection, sending single-row ``UPDATE accounts ... WHERE id = :random`` at a fixed
schedule (``--rate`` in all, like pgbench's ``--rate``; a Python client, so that it can be stopped
the moment the apply ends). Latency = the wait past the transaction's scheduled time + its own
time (what a user sees); the longest write stall = the longest time of one UPDATE from the start
of the apply on. The backfill of every row has no pw_migrate form: its plain form is the
``UPDATE`` a team writes with ``migrator.sql``, run by pw_migrate in its transaction. It prints the
table and rewrites the "Zero downtime" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import psycopg2
from backup import REPO, sql, write_section  # bench/backup.py: same cluster helpers and RESULTS.md

from dbcore.services.postgres import PostgresCluster

SECTION = "## Zero downtime"
LOCK_TIMEOUT = "2s"
APPLY_AT = 2.0  # seconds of load before the apply
AFTER = 1.0  # seconds of load after it

MODELS = '''import peewee as pw


class Owner(pw.Model):
    name = pw.CharField(max_length=50)

    class Meta:
        table_name = "owner"


class Accounts(pw.Model):
    balance = pw.IntegerField()
    owner_name = pw.TextField(null=True)
    note = pw.TextField(null=True)

    class Meta:
        table_name = "accounts"

'''


def _file(body: str) -> str:
    return (MODELS + "\ndef migrate(migrator, database, *, fake=False):\n    " + body
            + "\n\n\ndef rollback(migrator, database, *, fake=False):\n    pass\n")


#: change -> (the file pw_migrate applies, the file dbmigrate applies): the same file but for the backfill
CHANGES = {
    "add_index": (_file('migrator.add_index(Accounts, "owner_name")'),) * 2,
    "add_fields ForeignKeyField": (_file(
        'migrator.add_fields(Accounts, owner=pw.ForeignKeyField(Owner, null=True, index=False))'),) * 2,
    "add_not_null": (_file('migrator.add_not_null(Accounts, "owner_name")'),) * 2,
    "unique field": (_file('migrator.add_fields(Accounts, code=pw.CharField(max_length=40, null=True, '
                           'unique=True))'),) * 2,
    "backfill of every row": (
        _file('migrator.sql("UPDATE accounts SET note = \'n\' || id")'),
        _file('migrator.backfill("accounts", set={"note": pw.SQL("\'n\' || id")}, batch_size=10_000, '
              'pause=0.05)'),
    ),
}


@dataclass(frozen=True)
class Result:
    p99: float  # ms, latency (lag + time) of the UPDATEs scheduled while the apply ran
    worst: float  # ms, the longest time of one UPDATE from the start of the apply on
    apply_seconds: float
    writes: int
    errors: int


class Load:
    """4 writer clients at a fixed schedule; each records (scheduled, started, ended)."""

    def __init__(self, url: str, rate: int, rows: int) -> None:
        self.url, self.rate, self.rows = url, rate, rows
        self.samples: list[tuple[float, float, float]] = []
        self.errors = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,)) for i in range(4)]

    def _client(self, number: int) -> None:
        conn = psycopg2.connect(self.url, application_name=f"writer {number}")
        conn.autocommit = True
        rng = random.Random(number)
        interval = 4.0 / self.rate
        scheduled = time.time() + number * interval / 4
        with conn.cursor() as cur:
            while not self.stop.is_set():
                delay = scheduled - time.time()
                if delay > 0:
                    time.sleep(delay)
                started = time.time()
                try:
                    cur.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s",
                                (rng.randint(1, self.rows),))
                except psycopg2.Error:
                    self.errors += 1
                ended = time.time()
                with self.lock:
                    self.samples.append((scheduled, started, ended))
                scheduled += interval
        conn.close()

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()

    def result(self, start: float, end: float) -> tuple[float, float, int]:
        window = [(e - s) * 1000 for s, _, e in self.samples if start <= s <= end]
        worst = max(((e - b) * 1000 for _, b, e in self.samples if e >= start), default=0.0)
        return percentile(window, 0.99), worst, len(window)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run(cluster: PostgresCluster, name: str, tool: str, source: str | None, args, root: Path,
        n: int) -> Result:
    dbname = f"z{n}"
    sql(cluster.url("postgres"), f"CREATE DATABASE {dbname} TEMPLATE seed")
    url = cluster.url(dbname)
    folder = root / dbname / "migrations"
    folder.mkdir(parents=True)
    if source is not None:
        (folder / "001_change.py").write_text(source)
    try:
        with Load(url, args.rate, args.rows) as load:
            time.sleep(APPLY_AT)
            start = time.time()
            if tool == "pw_migrate":
                done = subprocess.run([str(Path(sys.executable).parent / "pw_migrate"), "migrate",
                                       "--database", url, "--directory", str(folder)],
                                      capture_output=True, text=True, timeout=3600)
                if done.returncode != 0:
                    raise SystemExit(f"pw_migrate failed on {name}: {done.stderr[-1500:]}")
            elif tool == "dbmigrate":  # as a user types it, like pw_migrate: its own process, no GIL shared
                env = {**os.environ, "DATABASE_URL": url, "MIGRATE_MIGRATIONS_DIR": str(folder),
                       "MIGRATE_LOCK_TIMEOUT": LOCK_TIMEOUT, "MIGRATE_LOCAL_DIR": str(root / dbname / ".local")}
                done = subprocess.run([sys.executable, "-m", "dbcore.cli", "apply", "--env", "local"],
                                      capture_output=True, text=True, timeout=3600, env=env, cwd=REPO)
                if done.returncode != 0:
                    raise SystemExit(f"dbmigrate failed on {name}: {done.stderr[-1500:]}")
            else:  # the baseline: load alone for as long as an apply would take
                time.sleep(args.baseline_seconds)
            end = time.time()
            time.sleep(AFTER)
        p99, worst, writes = load.result(start, end)
        return Result(p99, worst, round(end - start, 2), writes, load.errors)
    finally:
        sql(cluster.url("postgres"), f"DROP DATABASE {dbname} WITH (FORCE)")


def median(results: list[Result]) -> Result:
    return Result(*(statistics.median(getattr(r, f) for r in results)
                    for f in ("p99", "worst", "apply_seconds", "writes", "errors")))


def render(args, base: Result, table: dict[str, dict[str, Result]], size_mb: int, load: str) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    limit = float(LOCK_TIMEOUT.rstrip("s")) * 1000 + 500
    lines = [
        SECTION, "",
        f"`.venv/bin/python bench/zero_downtime.py --rows {args.rows} --rate {args.rate} --rounds "
        f"{args.rounds}`, {when}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"PostgreSQL 15 (fsync off). `accounts`: {args.rows} rows, {size_mb} MB with its primary key "
        "(8M rows make the issue's 1 GB; the plain forms' stalls grow with the table, the safe "
        "forms' stay bounded by their batches and lock_timeout). "
        f"Writes: 4 clients, {args.rate} single-row UPDATEs/s in all, scheduled like pgbench's "
        "--rate (a Python client, stopped as the apply ends). p99 = latency (wait past the schedule "
        "+ the UPDATE's time) of the UPDATEs scheduled while the apply ran; longest stall = the "
        "longest single UPDATE from the apply's start on. dbmigrate runs with lock_timeout "
        f"{LOCK_TIMEOUT} and its defaults (index builds with MIGRATE_INDEX_BUILD_WORKERS=0); its "
        "time includes phases 2-4. Each tool runs as a user types it, in its own process (`dbmigrate "
        "apply`, `pw_migrate migrate`): its start-up is inside the window. pw_migrate runs the same "
        "file (the backfill: "
        "the plain `UPDATE` a team would write). Medians of "
        f"{args.rounds} round(s). {load}", "",
        f"Baseline (writes alone, {args.baseline_seconds:g} s): p99 {base.p99:.1f} ms, longest stall "
        f"{base.worst:.0f} ms.", "",
        "| change | tool | apply s | longest write stall ms | p99 ms | p99 vs baseline | write errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    verdicts = []
    for name, by_tool in table.items():
        for tool in ("pw_migrate", "dbmigrate"):
            r = by_tool[tool]
            ratio = r.p99 / base.p99 if base.p99 else 0.0
            lines.append(f"| {name} | {tool} | {r.apply_seconds:.2f} | {r.worst:.0f} | {r.p99:.1f} | "
                         f"{ratio:.2f}x | {r.errors:.0f} |")
        safe = by_tool["dbmigrate"]
        ok_stall = safe.worst <= limit
        ok_p99 = safe.p99 <= 2 * base.p99
        verdicts.append(f"- {name}: longest stall {safe.worst:.0f} ms "
                        f"({'met' if ok_stall else 'NOT met'}), p99 {safe.p99 / base.p99 if base.p99 else 0:.2f}x "
                        f"the baseline ({'met' if ok_p99 else 'NOT met'}); pw_migrate's plain form: "
                        f"{by_tool['pw_migrate'].worst:.0f} ms, "
                        f"{by_tool['pw_migrate'].p99 / base.p99 if base.p99 else 0:.2f}x")
    lines += ["", f"Targets of issue 20 (the safe forms): longest stall <= lock_timeout + 0.5 s "
                  f"({limit:.0f} ms), p99 <= 2x the baseline:", "", *verdicts, ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    parser.add_argument("--only", action="append", help="run only this change (repeatable)")
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    parser.add_argument("--note", default="", help="a sentence on what else ran on the machine")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-zd-"))
    root.chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
    cluster = PostgresCluster(root / "pg")
    try:
        cluster.init()
        cluster.start(fast=True)
        sql(cluster.url("postgres"), "CREATE DATABASE seed")
        seed = cluster.url("seed")
        sql(seed, "CREATE TABLE owner (id serial PRIMARY KEY, name varchar(50) NOT NULL); "
                  "INSERT INTO owner (name) SELECT 'o' || g FROM generate_series(1, 1000) g")
        sql(seed, f"CREATE TABLE accounts AS SELECT g AS id, 0 AS balance, md5(g::text) || md5((g * 7)::text) "
                  f"AS owner_name, NULL::text AS note FROM generate_series(1, {args.rows}) g; "
                  "ALTER TABLE accounts ALTER COLUMN balance SET NOT NULL; "
                  "ALTER TABLE accounts ADD PRIMARY KEY (id)")
        sql(seed, "VACUUM ANALYZE accounts")
        size_mb = sql(seed, "SELECT pg_total_relation_size('accounts') / 1048576")[0][0]
        load_before = os.getloadavg()[0]
        n = 0
        base_runs: list[Result] = []
        results: dict[str, dict[str, list[Result]]] = {}
        for _ in range(args.rounds):
            n += 1
            base_runs.append(run(cluster, "baseline", "none", None, args, root, n))
            print(f"baseline: {base_runs[-1]}", file=sys.stderr, flush=True)
            for name, (plain, safe) in CHANGES.items():
                if args.only and name not in args.only:
                    continue
                for tool, source in (("pw_migrate", plain), ("dbmigrate", safe)):
                    n += 1
                    result = run(cluster, name, tool, source, args, root, n)
                    results.setdefault(name, {}).setdefault(tool, []).append(result)
                    print(f"{name} / {tool}: {result}", file=sys.stderr, flush=True)
        load = (f"Load average (1 min) before / after: {load_before:.2f} / {os.getloadavg()[0]:.2f}. "
                f"{args.note}").strip()
        table = {name: {tool: median(rs) for tool, rs in by_tool.items()} for name, by_tool in results.items()}
        report = render(args, median(base_runs), table, size_mb, load)
        print(report)
        if not args.no_write:
            write_section(report, SECTION)
            print(f"written to {(REPO / 'bench' / 'RESULTS.md').relative_to(REPO)}", file=sys.stderr)
        return 0
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
