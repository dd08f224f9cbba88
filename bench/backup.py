"""Benchmark of `dbmigrate backup` against plain pg_dump, on a generated ~200 MB database.

Run: ``.venv/bin/python bench/backup.py [--rounds 3] [--size-mb 200]``. It starts its own private
PostgreSQL cluster and SeaweedFS server in a temp folder, prints medians and ratios, and rewrites
the "Backup" section of bench/RESULTS.md (other sections are kept).

Half of the data is incompressible (random bytes, as uploaded files or hashes are), half is
ordinary rows (names, emails, amounts, timestamps, notes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

import psycopg2

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dbcore.backup.dump import backup_to_s3  # noqa: E402
from dbcore.backup.pgtools import find_pg_tool  # noqa: E402
from dbcore.backup.restore import restore_backup  # noqa: E402
from dbcore.connection import Env, Target  # noqa: E402
from dbcore.services.postgres import PostgresCluster  # noqa: E402
from dbcore.services.seaweed import SeaweedServer  # noqa: E402
from dbcore.settings import Settings  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Backup"
ACCESS_KEY, SECRET_KEY = "bench", "bench-" + uuid.uuid4().hex
BUCKET = "bench"


def sql(url: str, statement: str):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def generate(url: str, size_mb: int) -> int:
    """Fill the database: half random bytes, half ordinary rows; return its size in bytes."""
    half = size_mb * 1024 * 1024 // 2
    sql(url, "CREATE EXTENSION IF NOT EXISTS pgcrypto")
    # 1 KiB random per row: pglz cannot compress it, so the table really holds ~half the size
    sql(url, f"""
        CREATE TABLE attachments AS
        SELECT g AS id, gen_random_uuid() AS ref, gen_random_bytes(1024) AS content
        FROM generate_series(1, {half // 1100}) g""")
    sql(url, f"""
        CREATE TABLE orders AS
        SELECT g AS id, 'customer ' || (g % 50000) AS customer, 'user' || (g % 50000) || '@example.com' AS email,
               (g % 7)::int AS status, round((g % 100000) * 1.37, 2) AS amount,
               timestamptz '2024-01-01' + g * interval '1 second' AS created_at,
               CASE WHEN g % 3 = 0 THEN 'delivered to the front door, signed by the customer' ELSE
               'awaiting payment confirmation from the provider' END AS note
        FROM generate_series(1, {half // 150}) g""")
    sql(url, "ALTER TABLE orders ADD PRIMARY KEY (id); ALTER TABLE attachments ADD PRIMARY KEY (id)")
    sql(url, "VACUUM ANALYZE")
    return sql(url, "SELECT pg_database_size(current_database())")[0][0]


def busy_cpu() -> float:
    """CPU seconds spent by every process of the machine so far (user + system), 0 off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return 0.0
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait


CPU: dict[str, list[float]] = {}


def timed(fn, name: str | None = None) -> float:
    """Seconds ``fn`` takes, started with no dirty pages of an earlier step left to write back.

    With ``name``, the CPU seconds the whole machine spent meanwhile are recorded in CPU[name]
    (pg_dump, the server, zstd, boto3 and the S3 server: all of them run here).
    """
    os.sync()
    cpu = busy_cpu()
    started = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    if name:
        CPU.setdefault(name, []).append(busy_cpu() - cpu)
    return elapsed


def run(cmd: list[str], **kwargs) -> None:
    subprocess.run(cmd, check=True, **kwargs)


def dump(pg_dump: str, url: str, dest: str, *options: str) -> None:
    """``pg_dump -Fc OPTIONS URL > dest``, redirected as a shell would (``-f`` would also fsync)."""
    with open(dest, "wb") as out:
        run([pg_dump, "-Fc", *options, url], stdout=out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-"))
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
        return bench(args, cluster, s3, root)
    finally:
        s3.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def bench(args, cluster: PostgresCluster, s3: SeaweedServer, root: Path) -> int:
    sql(cluster.url(), "CREATE DATABASE bench")
    url = cluster.url("bench")
    print(f"generating a ~{args.size_mb} MB database ...", file=sys.stderr)
    db_size = generate(url, args.size_mb)
    settings = Settings(s3_bucket=BUCKET, s3_endpoint_url=s3.endpoint_url, local_dir=root / "local")
    target = Target(Env.LOCAL, url)
    pg_dump = str(find_pg_tool("pg_dump", 15).path)
    pg_restore = str(find_pg_tool("pg_restore", 15).path)
    client = s3.client()
    default_file = root / "default.dump"
    downloaded = root / "downloaded.dump"
    cli_env = dict(os.environ, MIGRATE_S3_BUCKET=BUCKET, MIGRATE_S3_ENDPOINT_URL=s3.endpoint_url,
                   DATABASE_URL=url)
    dbmigrate = str(Path(sys.executable).parent / "dbmigrate")

    def restore_default() -> None:
        sql(cluster.url(), "CREATE DATABASE r_default")
        run([pg_restore, "-j", "2", "--no-owner", "-d", cluster.url("r_default"), str(default_file)])

    def restore_downloaded_default() -> None:
        # the fair baseline: the default dump also has to come back from the bucket first
        client.download_file(BUCKET, "naive/default.dump", str(downloaded))
        sql(cluster.url(), "CREATE DATABASE r_naive")
        run([pg_restore, "-j", "2", "--no-owner", "-d", cluster.url("r_naive"), str(downloaded)])

    def restore_ours(jobs: int = 2) -> None:
        restore_backup(key, Target(Env.LOCAL, cluster.url("r_ours")), settings, jobs=jobs)

    def restore_default_j3() -> None:
        sql(cluster.url(), "CREATE DATABASE r_default3")
        run([pg_restore, "-j", "3", "--no-owner", "-d", cluster.url("r_default3"), str(default_file)])

    times: dict[str, list[float]] = {name: [] for name in (
        "pg_dump -Fc > /dev/null", "pg_dump -Fc -Z0 > /dev/null", "pg_dump -Fc > file, then upload",
        "backup_to_s3 (zstd 1)", "dbmigrate backup (CLI process)", "backup_to_s3 (zstd 3)",
        "backup_to_s3 (zstd 1, 1 thread)", "backup_to_s3 (zstd -1)",
        "restore: pg_restore -j2 of the local default dump",
        "restore: download the default dump, pg_restore -j2",
        "restore: dbmigrate restore (download + zstd + -j2)",
        "restore: pg_restore -j3 of the local default dump",
        "restore: dbmigrate restore (download + zstd + -j3)",
    )}
    sizes: dict[str, int] = {}
    dump(pg_dump, url, os.devnull, "-Z0")  # warm the cache once
    for number in range(1, args.rounds + 1):
        print(f"round {number}/{args.rounds} ...", file=sys.stderr)
        t = times
        t["pg_dump -Fc > /dev/null"].append(timed(lambda: dump(pg_dump, url, os.devnull)))
        t["pg_dump -Fc -Z0 > /dev/null"].append(
            timed(lambda: dump(pg_dump, url, os.devnull, "-Z0"), "pg_dump -Fc -Z0 > /dev/null"))
        t["pg_dump -Fc > file, then upload"].append(timed(lambda: (
            dump(pg_dump, url, str(default_file)),
            client.upload_file(str(default_file), BUCKET, "naive/default.dump"))))
        sizes["pg_dump -Fc (zlib 6)"] = default_file.stat().st_size
        holder = {}
        t["backup_to_s3 (zstd 1)"].append(timed(lambda: holder.update(info=backup_to_s3(target, settings)),
                                                "backup_to_s3 (zstd 1)"))
        key = holder["info"].key
        sizes["dbmigrate backup (zstd 1)"] = holder["info"].size
        out = {}
        t["dbmigrate backup (CLI process)"].append(timed(lambda: out.update(json.loads(subprocess.run(
            [dbmigrate, "backup", "--json"], env=cli_env, check=True, capture_output=True).stdout))))
        level3 = settings.model_copy(update={"backup_zstd_level": 3})
        t["backup_to_s3 (zstd 3)"].append(timed(lambda: holder.update(l3=backup_to_s3(target, level3))))
        sizes["backup_to_s3 (zstd 3)"] = holder["l3"].size
        one_thread = settings.model_copy(update={"backup_zstd_threads": 1})
        t["backup_to_s3 (zstd 1, 1 thread)"].append(
            timed(lambda: holder.update(t1=backup_to_s3(target, one_thread))))
        fast = settings.model_copy(update={"backup_zstd_level": -1})
        t["backup_to_s3 (zstd -1)"].append(timed(lambda: holder.update(fast=backup_to_s3(target, fast))))
        sizes["backup_to_s3 (zstd -1)"] = holder["fast"].size
        t["restore: pg_restore -j2 of the local default dump"].append(timed(restore_default))
        t["restore: download the default dump, pg_restore -j2"].append(timed(restore_downloaded_default))
        t["restore: dbmigrate restore (download + zstd + -j2)"].append(timed(restore_ours))
        sql(cluster.url(), "DROP DATABASE r_ours WITH (FORCE)")
        t["restore: pg_restore -j3 of the local default dump"].append(timed(restore_default_j3))
        t["restore: dbmigrate restore (download + zstd + -j3)"].append(timed(lambda: restore_ours(3)))
        for name in ("r_default", "r_naive", "r_ours", "r_default3"):
            sql(cluster.url(), f"DROP DATABASE {name} WITH (FORCE)")
        # the server's volumes would otherwise grow by ~450 MB a round
        for stored in (key, holder["l3"].key, holder["t1"].key, holder["fast"].key, out["key"],
                       "naive/default.dump"):
            client.delete_object(Bucket=BUCKET, Key=stored)
    sizes["pg_dump -Fc -Z0 (uncompressed)"] = len_z0(pg_dump, url)

    med = {name: statistics.median(values) for name, values in times.items()}
    report = render(args, db_size, med, times, sizes)
    print(report)
    if not args.no_write:
        write_section(report)
        print(f"\nwritten to {RESULTS.relative_to(REPO)}", file=sys.stderr)
    return 0


def len_z0(pg_dump: str, url: str) -> int:
    out = subprocess.run([pg_dump, "-Fc", "-Z0", url], check=True, capture_output=True).stdout
    return len(out)


def render(args, db_size: int, med: dict[str, float], times: dict[str, list[float]],
           sizes: dict[str, int]) -> str:
    default, z0 = med["pg_dump -Fc > /dev/null"], med["pg_dump -Fc -Z0 > /dev/null"]
    ours = med["backup_to_s3 (zstd 1)"]
    restore_default = med["restore: pg_restore -j2 of the local default dump"]
    restore_naive = med["restore: download the default dump, pg_restore -j2"]
    restore_ours = med["restore: dbmigrate restore (download + zstd + -j2)"]
    mb = 1024 * 1024
    lines = [
        SECTION, "",
        f"`.venv/bin/python bench/backup.py --rounds {args.rounds} --size-mb {args.size_mb}`, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, PostgreSQL 15, "
        "SeaweedFS on 127.0.0.1. Database: "
        f"{db_size / mb:.0f} MB (`pg_database_size`), half random bytes, half ordinary rows.",
        "",
        "| what | median s | vs `pg_dump -Fc > /dev/null` | vs `pg_dump -Fc -Z0 > /dev/null` | rounds (s) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, value in med.items():
        rounds = ", ".join(f"{v:.2f}" for v in times[name])
        lines.append(f"| {name} | {value:.2f} | {value / default:.2f}x | {value / z0:.2f}x | {rounds} |")
    lines += ["", "| stored | MB | vs `pg_dump -Fc` |", "|---|---:|---:|"]
    base = sizes["pg_dump -Fc (zlib 6)"]
    for name, size in sizes.items():
        lines.append(f"| {name} | {size / mb:.1f} | {size / base:.2f}x |")

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT met"

    stored = sizes["dbmigrate backup (zstd 1)"]
    command = med["dbmigrate backup (CLI process)"]
    restore_default3 = med["restore: pg_restore -j3 of the local default dump"]
    restore_ours3 = med["restore: dbmigrate restore (download + zstd + -j3)"]
    cores = os.cpu_count() or 1
    cpu_z0 = statistics.median(CPU.get("pg_dump -Fc -Z0 > /dev/null") or [0])
    cpu_ours = statistics.median(CPU.get("backup_to_s3 (zstd 1)") or [0])
    lines += [
        "", "Targets of issue 3, for `backup_to_s3` (what the flow calls, in a running process) and for "
        "the `dbmigrate backup` command (which also pays Python's and boto3's start-up):", "",
        f"- backup end to end <= 0.5x `pg_dump -Fc > /dev/null`: {ours / default:.2f}x in process, "
        f"{command / default:.2f}x as a command: {verdict(max(ours, command) <= 0.5 * default)}",
        f"- backup within 1.5x of `pg_dump -Fc -Z0 > /dev/null`: {ours / z0:.2f}x in process, "
        f"{command / z0:.2f}x as a command: {verdict(max(ours, command) <= 1.5 * z0)}",
        f"- stored object no larger than the default dump: {stored / base:.2f}x, {verdict(stored <= base)}",
        f"- restore no slower than restoring the default dump: {restore_ours / restore_default:.2f}x "
        f"of a local default dump ({verdict(restore_ours <= restore_default)}); "
        f"{restore_ours / restore_naive:.2f}x of downloading it then restoring it "
        f"({verdict(restore_ours <= restore_naive)}); with `-j3` on both sides "
        f"{restore_ours3 / restore_default3:.2f}x ({verdict(restore_ours3 <= restore_default3)})",
        "",
        f"CPU seconds spent by the whole machine (median, all processes): `pg_dump -Fc -Z0 > /dev/null` "
        f"{cpu_z0:.2f}, `backup_to_s3` {cpu_ours:.2f}. On {cores} cores the backup cannot take less "
        f"than {cpu_ours / cores:.2f} s even with every core busy all the time, "
        f"{cpu_ours / cores / z0:.2f}x of `-Z0`.",
        "",
        "Run to run: on this VM the same restore code measured 1.7 s in one run and 2.5-2.9 s in "
        "another (and the reverse for two versions of the code swapped between runs): read the "
        "restore verdict within about +-40%; the backup rows vary much less.", "",
        "Reading it: pg_dump, its server process, the zstd threads, boto3 and the S3 server share "
        "the same cores here. A profile of one backup (CPU seconds): pg_dump and its server process "
        "~1.2-1.4 (the whole of `-Z0 > /dev/null`), zstd level 1 ~0.4, hashing and boto3 ~0.2, and the "
        "SeaweedFS server ~1.0 to take in the ~104 MB (measured alone: the same whatever the part "
        "size, 8-64 MiB, parts in flight, 1-4, or with botocore's CRC32 off). That is about 3 CPU "
        "seconds (line above) for a ~1 s `-Z0` dump, so within 1.5x would need both cores busy "
        "without a gap and nothing else running: the 1.5x target is not met on this 2-core machine with the "
        "S3 server on it; against a remote bucket the server's ~1 CPU s leaves the machine (TLS adds some back).",
        "",
        "Tried, side by side: zstd negative levels compress faster but leave literals without "
        "entropy coding, and pg_dump writes bytea as hex text: level -1 stores about twice level 1 "
        "(table above; -3 and -5 were larger still), more than the default dump, so they fail the "
        "size target and level 1 stays. One zstd thread against one per core: within the noise, "
        "so one per core stays. zstd level-1 parameters (hash log, window, min match, job size), a "
        "4 MiB pipe read, a larger pipe buffer and a 1 MiB stdout buffer for pg_dump: within the "
        "noise. What helped: the S3 client now shares botocore's parsed service models within a "
        "process (a new client cost 0.07-0.13 s, now ~0.015 s after the first; the flow and this "
        "bench call `backup_to_s3` in one process, the CLI row still pays it once), and a restore "
        "hashes the compressed bytes as they arrive while a thread decompresses and writes them "
        "(download + check + decompress 0.57 s -> 0.47 s median), the checksum still checked "
        "before the target is created or touched. A larger download chunk (256 KiB-8 MiB) and "
        "data offsets in the archive (a dump written to a pipe has none) made no measurable "
        "difference to the restore, nor did `pg_restore -j3` against `-j2` (rows above, on both "
        "sides), so the default jobs (`min(4, cores)`) stay.",
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str, heading: str = SECTION) -> None:
    """Replace the ``heading`` section of RESULTS.md (or append it), keeping every other section."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    start = text.find(heading + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(heading))
        rest = "\n" + text[end + 1:] if end >= 0 else ""
        text = text[:start] + section + rest
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
