"""Benchmark of the time to plan: `python flows/migrate.py --env local --dry-run` against doing the same by hand.

Run: ``.venv/bin/python bench/flow.py [--sizes 100,400,1500] [--rounds 1]``. It starts its own
private PostgreSQL cluster and SeaweedFS server in a temp folder, builds one database of the
sample application per size (migrations 001-003 applied, 004 pending, the ``document`` table
filled with text), and measures side by side, in one run:

- (a) ``pg_dump -Fc > /dev/null``: what a careful person runs before a deploy;
- (b) a hand-made copy: ``createdb scratch && pg_dump -Fc -Z0 | pg_restore -d scratch``: the
  same work as the flow's rehearsal (a copy of the data to apply on), without storing a backup;
- (c) the flow's dry run as a user types it after `make run` (a new process, the local Prefect API
  that `make run` keeps), with the time of every stage read from the run's own log lines;
- (c') the same without that API: the run starts Prefect's temporary API of its own (warm
  PREFECT_HOME), as ``python flows/migrate.py`` does where nothing else is set up.

It prints the ratios and how each grows with size, and rewrites the "Time to plan" section of
bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
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

from dbcore.backup.pgtools import find_pg_tool  # noqa: E402
from dbcore.services.postgres import PostgresCluster  # noqa: E402
from dbcore.services.prefect_api import PrefectApiServer  # noqa: E402
from dbcore.services.seaweed import SeaweedServer  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Time to plan"
ACCESS_KEY, SECRET_KEY = "bench", "bench-" + uuid.uuid4().hex
BUCKET = "bench"
PYTHON = sys.executable
#: a Prefect log line: "12:00:01.234 | INFO    | Task run 'backup-1a2' - Finished in state Completed()"
LOG_LINE = re.compile(r"^(\d\d):(\d\d):(\d\d)\.(\d{3}) \| \w+ +\| (.*)$")


def sql(url: str, statement: str, params=None):
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return cur.fetchall() if cur.description else None
    finally:
        conn.close()


def generate(url: str, env: dict[str, str], size_mb: int) -> int:
    """Apply 001-003 of the sample app, fill ``document`` to about ``size_mb``; return the size in bytes."""
    subprocess.run([str(Path(PYTHON).parent / "dbmigrate"), "apply", "--target", "003"], env=env,
                   check=True, capture_output=True)
    sql(url, "INSERT INTO project (name, created_at, updated_at, slug) VALUES ('bench', now(), now(), 'bench')")
    sql(url, "INSERT INTO sourcedir (project_id, path, created_at, updated_at) "
             "SELECT id, 'docs/' || g, now(), now() FROM project, generate_series(1, 100) g")
    # ~420 bytes a row on disk with its indexes: a sentence and hex digests (as ids, hashes and
    # tokens are), under TOAST's 2 KB threshold so stored as is, about half that in a dump
    digests = " || ' ' || ".join(f"encode(sha512((g * 2 + {i})::text::bytea), 'hex')" for i in range(2))
    rows = size_mb * 1024 * 1024 // 420
    for start in range(0, rows, 200_000):
        sql(url, f"""
            INSERT INTO document (sourcedir_id, filename, content, created_at, updated_at)
            SELECT 1 + g % 100, 'file_' || g || '.md',
                   'the quick brown fox jumps over the lazy dog, chapter ' || (g % 977) || ': ' || {digests},
                   now(), now()
            FROM generate_series({start + 1}, {min(rows, start + 200_000)}) g""")
    sql(url, "VACUUM ANALYZE")
    return sql(url, "SELECT pg_database_size(current_database())")[0][0]


def to_null(cmd: list[str]) -> int:
    """Run ``cmd > /dev/null`` as a shell would (pg_dump's ``-f`` would also fsync); return the bytes it wrote."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    size = 0
    while chunk := proc.stdout.read(1 << 20):
        size += len(chunk)
    if proc.wait() != 0:
        raise RuntimeError(f"{cmd[0]} failed")
    return size


def dbmigrate_backup(env: dict[str, str]) -> int:
    """Run `dbmigrate backup --json` as a user would; return the size of the stored object."""
    out = subprocess.run([str(Path(PYTHON).parent / "dbmigrate"), "backup", "--json"], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["size"]


def timed(fn) -> float:
    os.sync()
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def hand_copy(pg_dump: str, pg_restore: str, server_url: str, url: str, name: str) -> None:
    """``createdb NAME && pg_dump -Fc -Z0 URL | pg_restore -d NAME``, then drop it."""
    sql(server_url, f'CREATE DATABASE "{name}"')
    dump = subprocess.Popen([pg_dump, "-Fc", "-Z0", url], stdout=subprocess.PIPE)
    restore = subprocess.run([pg_restore, "--no-owner", "-d", server_url.rsplit("/", 1)[0] + "/" + name],
                             stdin=dump.stdout, capture_output=True)
    dump.stdout.close()
    if dump.wait() != 0 or restore.returncode != 0:
        raise RuntimeError(f"hand copy failed: {restore.stderr.decode()[-500:]}")
    sql(server_url, f'DROP DATABASE "{name}"')


def _seconds(match: re.Match) -> float:
    h, m, s, ms = (int(match.group(i)) for i in range(1, 5))
    return h * 3600 + m * 60 + s + ms / 1000


def dry_run(env: dict[str, str]) -> tuple[float, dict[str, float], str]:
    """Run the flow's dry run as a user would; return (seconds to the plan, seconds per stage, last line).

    The plan is there when the run logs it (the artifact is written just before); the process
    then still stops Prefect's temporary API, which is shown as its own stage.
    """
    started_wall = datetime.now()
    started = time.perf_counter()
    proc = subprocess.run([PYTHON, str(REPO / "flows" / "migrate.py"), "--env", "local", "--dry-run"],
                          env=env, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"the dry run failed: {proc.stdout[-800:]}{proc.stderr[-2000:]}")
    stages: dict[str, float] = {}
    origin = started_wall.hour * 3600 + started_wall.minute * 60 + started_wall.second + \
        started_wall.microsecond / 1e6
    last = origin
    for line in (proc.stderr + proc.stdout).splitlines():
        m = LOG_LINE.match(line)
        if not m:
            continue
        at, text = _seconds(m), m.group(5)
        if "Beginning flow run" in text:
            stages["Prefect start-up (process, API, flow run)"] = at - origin
            last = at
        task = re.match(r"Task run '([a-z-]+)-[0-9a-f]+' - Finished in state", text)
        if task:
            stages[task.group(1)] = stages.get(task.group(1), 0.0) + at - last
            last = at
        if text.endswith(" - plan:") and "to the plan" not in stages:
            stages["plan artifact"] = at - last
            stages["to the plan"] = at - origin
            last = at
    stages["after the plan: the run's end, exit"] = origin + wall - last
    return stages.get("to the plan", wall), stages, proc.stdout.strip().splitlines()[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,400,1500", help="database sizes in MB")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]

    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-flow-"))
    root.chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
    cluster = PostgresCluster(root / "pg")
    s3 = SeaweedServer(root / "s3", ACCESS_KEY, SECRET_KEY)
    api = PrefectApiServer(root / "prefect-api")
    try:
        cluster.init()
        cluster.start(fast=True)
        s3.start()
        s3.create_bucket(BUCKET)
        api.start()
        return bench(args, sizes, cluster, s3, root, api)
    finally:
        api.stop()
        s3.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def bench(args, sizes: list[int], cluster: PostgresCluster, s3: SeaweedServer, root: Path,
          api: PrefectApiServer) -> int:
    pg_dump = str(find_pg_tool("pg_dump", 15).path)
    pg_restore = str(find_pg_tool("pg_restore", 15).path)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MIGRATE_", "AWS_"))}
    base_env.update(
        AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY, AWS_DEFAULT_REGION="us-east-1",
        MIGRATE_S3_BUCKET=BUCKET, MIGRATE_S3_ENDPOINT_URL=s3.endpoint_url,
        MIGRATE_LOCAL_DIR=str(root / "local"), MIGRATE_MIGRATIONS_DIR=str(REPO / "migrations"),
        MIGRATE_MODELS="dbcore.models:MODELS",
        PREFECT_HOME=str(root / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120", PREFECT_LOGGING_LEVEL="INFO",
    )
    rows: list[dict] = []
    warm = True
    for size in sizes:
        name = f"bench_{size}"
        sql(cluster.url(), f'CREATE DATABASE "{name}"')
        url = cluster.url(name)
        temporary_api_env = dict(base_env, DATABASE_URL=url)
        env = dict(temporary_api_env, PREFECT_API_URL=api.api_url)
        print(f"generating a ~{size} MB database ...", file=sys.stderr)
        db_size = generate(url, env, size)
        to_null([pg_dump, "-Fc", "-Z0", url])  # warm the cache
        if warm:  # a warm PREFECT_HOME, as on a developer's machine after the first run
            dry_run(env)
            dry_run(temporary_api_env)
            warm = False
        times: dict[str, list[float]] = {"a": [], "b": [], "c": [], "t": [], "d": []}
        sizes: dict[str, int] = {}
        stages: list[dict[str, float]] = []
        for number in range(1, args.rounds + 1):
            print(f"{size} MB round {number}/{args.rounds} ...", file=sys.stderr)
            times["a"].append(timed(lambda: sizes.update(a=to_null([pg_dump, "-Fc", url]))))
            times["d"].append(timed(lambda: sizes.update(d=dbmigrate_backup(env))))
            times["b"].append(timed(lambda: hand_copy(pg_dump, pg_restore, cluster.url(), url, f"{name}_hand")))
            holder: dict = {}
            times["c"].append(timed(lambda: holder.update(out=dry_run(env))))
            stages.append(holder["out"][1])
            last_line = holder["out"][2]
            temporary: dict = {}
            timed(lambda: temporary.update(out=dry_run(temporary_api_env)))
            times["t"].append(temporary["out"][0])
            temporary_stages = temporary["out"][1]
        med = {k: statistics.median(v) for k, v in times.items()}
        stage_med = {k: statistics.median(s.get(k, 0.0) for s in stages) for k in stages[0] if k != "to the plan"}
        rows.append({"size_mb": db_size / 2**20, "a": med["a"], "b": med["b"], "c": med["c"],
                     "t": med["t"], "d": med["d"], "dump_bytes": sizes["a"], "backup_bytes": sizes["d"],
                     "stages": stage_med, "temporary_stages": temporary_stages,
                     "line": last_line, "rounds": times})
        print(f"{db_size / 2**20:.0f} MB: pg_dump -Fc {med['a']:.1f}s, hand copy {med['b']:.1f}s, "
              f"dry run {med['c']:.1f}s = {med['c'] / med['b']:.2f}x the hand copy "
              f"(with a temporary API {med['t']:.1f}s)", file=sys.stderr)
        sql(cluster.url(), f'DROP DATABASE "{name}" WITH (FORCE)')
    report = render(rows)
    print(report)
    if not args.no_write:
        write_section(report)
    return 0


def render(rows: list[dict]) -> str:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [SECTION, "",
           f"`.venv/bin/python bench/flow.py --sizes {','.join(str(round(r['size_mb'])) for r in rows)}`, "
           f"{when}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
           f"{platform.python_version()}, PostgreSQL 15 and SeaweedFS on 127.0.0.1, warm PREFECT_HOME. "
           "Database: the sample app's tables, `document` filled with text.", "",
           "| database | (a) `pg_dump -Fc > /dev/null` | (b) hand copy `pg_dump -Fc -Z0 \\| pg_restore` "
           "| (c) dry run to plan | (c)/(b) | (c)/(a) | (c') with a temporary API | (c')/(b) |",
           "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['size_mb']:.0f} MB | {r['a']:.1f} s | {r['b']:.1f} s | {r['c']:.1f} s | "
                   f"{r['c'] / r['b']:.2f}x | {r['c'] / r['a']:.2f}x | {r['t']:.1f} s | {r['t'] / r['b']:.2f}x |")
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        gb = (last["size_mb"] - first["size_mb"]) / 1024
        out += ["", "Growth, seconds per GB between the smallest and the largest database: "
                f"(a) {(last['a'] - first['a']) / gb:.1f}, (b) {(last['b'] - first['b']) / gb:.1f}, "
                f"(c) {(last['c'] - first['c']) / gb:.1f}, (c') {(last['t'] - first['t']) / gb:.1f}."]
    out += ["", "`dbmigrate backup` as a command (a new process, as a user types it) against (a), "
            "on the same databases:", "",
            "| database | (d) `dbmigrate backup` | (d)/(a) | stored | pg_dump -Fc's size | stored / pg_dump's |",
            "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['size_mb']:.0f} MB | {r['d']:.1f} s | {r['d'] / r['a']:.2f}x | "
                   f"{r['backup_bytes'] / 2**20:.0f} MB | {r['dump_bytes'] / 2**20:.0f} MB | "
                   f"{r['backup_bytes'] / r['dump_bytes']:.2f}x |")
    out += ["", "Stages of the dry run: seconds, from the run's own log lines (a stage ends when its task "
            "finishes; the head start's backup and copy run during Prefect's start-up)."]
    for title, stages in (("(c) after `make run`", "stages"), ("(c') with a temporary API", "temporary_stages")):
        out += ["", f"{title}, the stages:", "",
                "| stage | " + " | ".join(f"{r['size_mb']:.0f} MB" for r in rows) + " |",
                "|---|" + "---:|" * len(rows)]
        names = list(dict.fromkeys(k for r in rows for k in r[stages] if k != "to the plan"))
        for name in names:
            out.append(f"| {name} | " + " | ".join(f"{r[stages].get(name, 0.0):.1f}" for r in rows) + " |")
    out += ["", f"The run's last line: `{rows[-1]['line']}`", ""]
    return "\n".join(out)


def write_section(report: str) -> None:
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(SECTION)
    if start == -1:
        text = text.rstrip() + "\n\n" + report
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + report + ("\n" + text[end + 1:] if end != -1 else "")
    RESULTS.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
