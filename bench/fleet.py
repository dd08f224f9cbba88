"""Benchmark of a fleet run: 20 small databases one at a time against four at once, on two workers.

Run: ``.venv/bin/python bench/fleet.py [--databases 20] [--concurrency 4]``. It starts its own
private PostgreSQL cluster, SeaweedFS server and ``prefect server start`` in a temp folder, deploys
``migrate/migrate-fleet-member`` (deployments/prefect.yaml) to a process pool served by two
``prefect worker start`` processes, and runs, as a user types it,
``python flows/fleet.py --env local --targets FILE --deployment migrate/migrate-fleet-member``
twice on fresh empty databases (the sample app's four migrations pending on each, a backup and a
rehearsal on a copy for every database, canary 1):

- (s) ``concurrency: 1``: one database after another;
- (c) ``concurrency: N``: N at once (the Prefect global concurrency limit), shared by the workers.

It prints the wall times and the ratio (s)/(c), and rewrites the "Fleet" section of
bench/RESULTS.md (other sections are kept).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
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

from dbcore.services.postgres import PostgresCluster  # noqa: E402
from dbcore.services.prefect_api import PrefectApiServer  # noqa: E402
from dbcore.services.seaweed import SeaweedServer  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Fleet"
ACCESS_KEY, SECRET_KEY = "bench", "bench-" + uuid.uuid4().hex
BUCKET = "bench"
BIN = Path(sys.executable).parent
RUN_TIMEOUT = 1800  # seconds for one fleet run


def create_databases(cluster: PostgresCluster, prefix: str, count: int) -> dict[str, str]:
    """Create ``count`` empty databases; return {variable name: URL}."""
    conn = psycopg2.connect(cluster.url())
    conn.autocommit = True
    urls = {}
    with conn.cursor() as cur:
        for i in range(1, count + 1):
            cur.execute(f'CREATE DATABASE "{prefix}_{i}"')
            urls[f"{prefix.upper()}_{i}_URL"] = cluster.url(f"{prefix}_{i}")
    conn.close()
    return urls


def targets_file(path: Path, urls: dict[str, str], concurrency: int) -> Path:
    path.write_text(f"canary: 1\nconcurrency: {concurrency}\ndatabases:\n" + "".join(
        f"  - {{name: {var.lower().removesuffix('_url')}, url_env: {var}}}\n" for var in urls))
    return path


def fleet_run(env: dict[str, str], targets: Path, log: Path) -> tuple[float, str]:
    """Run the fleet as a user types it; return (wall seconds, its last line)."""
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(REPO / "flows" / "fleet.py"), "--env", "local",
                           "--targets", str(targets), "--deployment", "migrate/migrate-fleet-member"],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
    wall = time.monotonic() - started
    log.write_text(proc.stdout + proc.stderr)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0:
        raise SystemExit(f"the fleet run failed ({last}); see {log}")
    return wall, last


def start_workers(env: dict[str, str], root: Path, count: int) -> list[subprocess.Popen]:
    workers = []
    for n in range(1, count + 1):
        out = (root / f"worker-{n}.log").open("wb")
        workers.append(subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", "migrations",
                                         "--name", f"bench-worker-{n}"], env=env, cwd=REPO,
                                        stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    deadline = time.monotonic() + 120
    while not all("started!" in (root / f"worker-{n}.log").read_text(errors="replace")
                  for n in range(1, count + 1)):
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            raise SystemExit(f"the workers did not start; see {root}/worker-*.log")
        time.sleep(0.5)
    return workers


def stop_workers(workers: list[subprocess.Popen]) -> None:
    for worker in workers:
        try:
            os.killpg(worker.pid, signal.SIGTERM)  # each in its own session: its runs too
        except ProcessLookupError:
            pass
    for worker in workers:
        try:
            worker.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="dbmigrate-bench-fleet-"))
    root.chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
    cluster = PostgresCluster(root / "pg")
    s3 = SeaweedServer(root / "s3", ACCESS_KEY, SECRET_KEY)
    api = PrefectApiServer(root / "prefect-api")
    workers: list[subprocess.Popen] = []
    try:
        cluster.init()
        cluster.start(fast=True)
        s3.start()
        s3.create_bucket(BUCKET)
        api.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MIGRATE_", "AWS_"))}
        env.update(AWS_ACCESS_KEY_ID=ACCESS_KEY, AWS_SECRET_ACCESS_KEY=SECRET_KEY,
                   AWS_DEFAULT_REGION="us-east-1", MIGRATE_S3_BUCKET=BUCKET,
                   MIGRATE_S3_ENDPOINT_URL=s3.endpoint_url, MIGRATE_LOCAL_DIR=str(root / "local"),
                   PREFECT_API_URL=api.api_url, PREFECT_HOME=str(root / "prefect"),
                   PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
                   PREFECT_WORKER_QUERY_SECONDS="1", PREFECT_LOGGING_LEVEL="WARNING")
        sequential_urls = create_databases(cluster, "seq", args.databases)
        concurrent_urls = create_databases(cluster, "par", args.databases)
        env.update(sequential_urls, **concurrent_urls)
        for cmd in (["work-pool", "create", "migrations", "--type", "process", "--overwrite"],
                    ["--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml",
                     "--name", "migrate-fleet-member"]):
            subprocess.run([str(BIN / "prefect"), *cmd], env=env, cwd=REPO, check=True,
                           capture_output=True, timeout=120)
        workers = start_workers(env, root, args.workers)
        print(f"(s) {args.databases} databases, concurrency 1 ...", file=sys.stderr)
        seq, seq_line = fleet_run(env, targets_file(root / "seq.yaml", sequential_urls, 1), root / "seq.log")
        print(f"    {seq:.1f} s: {seq_line}", file=sys.stderr)
        print(f"(c) {args.databases} databases, concurrency {args.concurrency} ...", file=sys.stderr)
        par, par_line = fleet_run(env, targets_file(root / "par.yaml", concurrent_urls, args.concurrency),
                                  root / "par.log")
        print(f"    {par:.1f} s: {par_line}", file=sys.stderr)
    finally:
        stop_workers(workers)
        api.stop()
        s3.stop()
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    report = "\n".join([
        SECTION, "",
        f"`.venv/bin/python bench/fleet.py --databases {args.databases} --concurrency {args.concurrency}`, "
        f"{when}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, Python "
        f"{platform.python_version()}, PostgreSQL 15, SeaweedFS and a Prefect server on 127.0.0.1, "
        f"{args.workers} process workers on the same machine. Each database: empty, the sample app's 4 "
        "migrations pending; each run backs it up, rehearses on a copy, applies and post-checks; canary 1.",
        "",
        "| fleet run | wall | per database | result |",
        "|---|---:|---:|---|",
        f"| (s) concurrency 1 | {seq:.1f} s | {seq / args.databases:.2f} s | {seq_line} |",
        f"| (c) concurrency {args.concurrency} | {par:.1f} s | {par / args.databases:.2f} s | {par_line} |",
        "", f"(s)/(c) = **{seq / par:.2f}x**", ""])
    print(report)
    if not args.no_write:
        write_section(report)
    return 0


def write_section(report: str) -> None:
    """Put ``report`` in place of the Fleet section of bench/RESULTS.md (or at its end)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
    start = text.find(SECTION + "\n")
    if start == -1:
        text = text.rstrip() + "\n\n" + report
    else:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + report + ("\n" + text[end + 1:] if end != -1 else "")
    RESULTS.write_text(text.rstrip() + "\n")


if __name__ == "__main__":
    sys.exit(main())
