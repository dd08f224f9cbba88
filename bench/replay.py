"""What the replay of applied migrations costs an apply, on 50 applied files.

Run: ``.venv/bin/python bench/replay.py [--files 50] [--rounds 5]``. It starts its own private
PostgreSQL cluster in a temp folder, applies ``--files`` generated migrations through the migrator
(file N creates t<N> and adds fields and an index to t<N-1>), then
times apply + rollback of one more migration written two ways: raw ``migrator.sql`` (needs no
models: nothing is replayed) and ``migrator.add_fields("t001", ...)`` (needs them: every applied file
replays). Prints medians and the ratio, and rewrites the "## Replay" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dbcore.connection import Env, Target, connect  # noqa: E402
from dbcore.migrate.plan import plan_apply, plan_rollback  # noqa: E402
from dbcore.migrate.router import FileRouter  # noqa: E402
from dbcore.migrate.runner import execute  # noqa: E402
from dbcore.services.postgres import PostgresCluster  # noqa: E402
from dbcore.settings import Settings  # noqa: E402

RESULTS = REPO / "bench" / "RESULTS.md"
SECTION = "## Replay"

APPLIED = '''\
import peewee as pw


def migrate(migrator, database, *, fake=False):
    @migrator.create_model
    class T{n:03d}(pw.Model):
        name = pw.CharField(max_length=100)
        created = pw.DateTimeField()
        {fk}

        class Meta:
            table_name = "t{n:03d}"

    {more}


def rollback(migrator, database, *, fake=False):
    migrator.remove_model("t{n:03d}")
'''
MORE = ('migrator.add_fields("t{p:03d}", note=pw.TextField(null=True), score=pw.IntegerField(default=0))\n'
        '    migrator.add_index("t{p:03d}", "name", unique=False)')
NEW = {
    "sql": ('migrator.sql("ALTER TABLE t001 ADD COLUMN extra text")',
            'migrator.sql("ALTER TABLE t001 DROP COLUMN extra")'),
    "orm": ('migrator.add_fields("t001", extra=pw.TextField(null=True))',
            'migrator.remove_fields("t001", "extra")'),
}


def write_folder(folder: Path, files: int) -> None:
    for n in range(1, files + 1):
        fk = (f'parent = pw.ForeignKeyField(migrator.orm["t{n - 1:03d}"], null=True)' if n > 1 else "")
        more = MORE.format(p=n - 1) if n > 1 else "pass"
        (folder / f"{n:03d}_t{n:03d}.py").write_text(APPLIED.format(n=n, fk=fk, more=more))


def time_new(target: Target, settings: Settings, folder: Path, files: int, style: str,
             rounds: int) -> float:
    up, down = NEW[style]
    path = folder / f"{files + 1:03d}_extra.py"
    path.write_text(f"import peewee as pw\n\n\ndef migrate(migrator, database, *, fake=False):\n"
                    f"    {up}\n\n\ndef rollback(migrator, database, *, fake=False):\n    {down}\n")
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        execute(plan_apply(target, settings), target, settings)
        execute(plan_rollback(target, settings), target, settings)
        seconds.append(time.perf_counter() - started)
    path.unlink()
    return statistics.median(seconds)


def replay_alone(target: Target, folder: Path, rounds: int) -> float:
    seconds = []
    db = connect(target)
    try:
        for _ in range(rounds):
            started = time.perf_counter()
            FileRouter(db, folder).migrator.orm  # noqa: B018 - the replay itself
            seconds.append(time.perf_counter() - started)
    finally:
        db.close()
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        Path(tmp).chmod(0o755)  # the server runs as postgres when we are root: it must reach pg/
        cluster = PostgresCluster(Path(tmp) / "pg")
        cluster.init()
        cluster.start(fast=True)
        try:
            folder = Path(tmp) / "migrations"
            folder.mkdir()
            write_folder(folder, args.files)
            target = Target(Env.LOCAL, cluster.url("postgres"))
            settings = Settings(migrations_dir=folder, local_dir=Path(tmp) / ".local")
            execute(plan_apply(target, settings), target, settings)
            sql = time_new(target, settings, folder, args.files, "sql", args.rounds)
            orm = time_new(target, settings, folder, args.files, "orm", args.rounds)
            alone = replay_alone(target, folder, args.rounds)
        finally:
            cluster.stop()
    lines = [
        SECTION, "",
        f"{args.files} applied files (create_model + add_fields + add_index each), median of "
        f"{args.rounds} rounds of apply + rollback of one new migration, {platform.processor() or platform.machine()}, "
        f"{__import__('os').cpu_count()} cores (`python bench/replay.py`):", "",
        "| new migration | apply + rollback | replays |", "|---|---|---|",
        f"| raw `migrator.sql` | {sql:.3f} s | nothing |",
        f"| `migrator.add_fields(\"t001\", ...)` | {orm:.3f} s | {args.files} files, twice |", "",
        f"Ratio: {orm / sql:.2f}x. The replay of {args.files} files alone: {alone * 1000:.0f} ms "
        f"({alone * 1000 / args.files:.1f} ms a file).", "",
    ]
    section = "\n".join(lines)
    print(section)
    if not args.no_write:
        text = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n\n"
        start = text.find(SECTION + "\n")
        if start < 0:
            text = text.rstrip("\n") + "\n\n" + section
        else:
            end = text.find("\n## ", start + len(SECTION))
            text = text[:start] + section + ("\n" + text[end + 1:] if end >= 0 else "")
        RESULTS.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
