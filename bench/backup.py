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

from dbcore.backup import backup_to_s3, restore_backup  # noqa: E402
from dbcore.connection import Env, Target  # noqa: E402
from dbcore.pgtools import find_pg_tool  # noqa: E402
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


def timed(fn) -> float:
    """Seconds ``fn`` takes, started with no dirty pages of an earlier step left to write back."""
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


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

    def restore_ours() -> None:
        restore_backup(key, Target(Env.LOCAL, cluster.url("r_ours")), settings, jobs=2)

    times: dict[str, list[float]] = {name: [] for name in (
        "pg_dump -Fc > /dev/null", "pg_dump -Fc -Z0 > /dev/null", "pg_dump -Fc > file, then upload",
        "backup_to_s3 (zstd 1)", "dbmigrate backup (CLI process)", "backup_to_s3 (zstd 3)",
        "restore: pg_restore -j2 of the local default dump",
        "restore: download the default dump, pg_restore -j2",
        "restore: dbmigrate restore (download + zstd + -j2)",
    )}
    sizes: dict[str, int] = {}
    dump(pg_dump, url, os.devnull, "-Z0")  # warm the cache once
    for number in range(1, args.rounds + 1):
        print(f"round {number}/{args.rounds} ...", file=sys.stderr)
        t = times
        t["pg_dump -Fc > /dev/null"].append(timed(lambda: dump(pg_dump, url, os.devnull)))
        t["pg_dump -Fc -Z0 > /dev/null"].append(
            timed(lambda: dump(pg_dump, url, os.devnull, "-Z0")))
        t["pg_dump -Fc > file, then upload"].append(timed(lambda: (
            dump(pg_dump, url, str(default_file)),
            client.upload_file(str(default_file), BUCKET, "naive/default.dump"))))
        sizes["pg_dump -Fc (zlib 6)"] = default_file.stat().st_size
        holder = {}
        t["backup_to_s3 (zstd 1)"].append(timed(lambda: holder.update(info=backup_to_s3(target, settings))))
        key = holder["info"].key
        sizes["dbmigrate backup (zstd 1)"] = holder["info"].size
        out = {}
        t["dbmigrate backup (CLI process)"].append(timed(lambda: out.update(json.loads(subprocess.run(
            [dbmigrate, "backup", "--json"], env=cli_env, check=True, capture_output=True).stdout))))
        level3 = settings.model_copy(update={"backup_zstd_level": 3})
        t["backup_to_s3 (zstd 3)"].append(timed(lambda: holder.update(l3=backup_to_s3(target, level3))))
        sizes["backup_to_s3 (zstd 3)"] = holder["l3"].size
        t["restore: pg_restore -j2 of the local default dump"].append(timed(restore_default))
        t["restore: download the default dump, pg_restore -j2"].append(timed(restore_downloaded_default))
        t["restore: dbmigrate restore (download + zstd + -j2)"].append(timed(restore_ours))
        for name in ("r_default", "r_naive", "r_ours"):
            sql(cluster.url(), f"DROP DATABASE {name} WITH (FORCE)")
        # the server's volumes would otherwise grow by ~450 MB a round
        for stored in (key, holder["l3"].key, out["key"], "naive/default.dump"):
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
    lines += [
        "", "Targets of issue 3 (backup = `backup_to_s3`, the function the CLI and the flow call):", "",
        f"- backup end to end <= 0.5x `pg_dump -Fc > /dev/null`: {ours / default:.2f}x, {verdict(ours <= 0.5 * default)}",
        f"- backup within 1.5x of `pg_dump -Fc -Z0 > /dev/null`: {ours / z0:.2f}x, {verdict(ours <= 1.5 * z0)}",
        f"- stored object no larger than the default dump: {stored / base:.2f}x, {verdict(stored <= base)}",
        f"- restore no slower than restoring the default dump: {restore_ours / restore_default:.2f}x "
        f"of a local default dump ({verdict(restore_ours <= restore_default)}); "
        f"{restore_ours / restore_naive:.2f}x of downloading it then restoring it "
        f"({verdict(restore_ours <= restore_naive)})",
        "",
        "Reading it: on this machine pg_dump, its server process, the zstd threads, boto3 and the "
        "S3 server share the same cores, so the upload competes with the dump for CPU; against a "
        "remote bucket only the upload's network time remains. zstd 1 stays the default: level 3 "
        "was slower and, in zstd's multi-threaded mode on this data, not smaller. A restore "
        "downloads and checks the whole object before it touches the target (the checksum comes "
        "first) and `pg_restore -j` needs a file, so it cannot overlap the download; it writes "
        "the uncompressed dump to a temp file (~2.3x the stored size of disk) and then restores "
        "without zlib.",
    ]
    return "\n".join(lines) + "\n"


def write_section(section: str) -> None:
    """Replace the "## Backup" section of RESULTS.md (or append it), keeping every other section."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(SECTION))
        rest = "\n" + text[end + 1:] if end >= 0 else ""
        text = text[:start] + section + rest
    RESULTS.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
