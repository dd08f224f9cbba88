"""Helpers shared by the tests (plain functions; fixtures live in conftest.py)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Callable

import psycopg2
import pytest

from dbcore.connection import Target
from dbcore.migrate.plan import RunReport, plan_apply, plan_rollback
from dbcore.migrate.runner import execute
from dbcore.services.postgres import find_pg_bindir
from dbcore.settings import Settings

REPO = Path(__file__).resolve().parent.parent
SAMPLE_MIGRATIONS = REPO / "migrations"
#: public projects' migration folders (tests/fixtures/REAL_CORPUS.md), kept outside the repository:
#: their code is not ours to commit. Tests on them run where DBMIGRATE_REAL_CORPUS names the folder.
REAL_CORPUS = Path(os.environ["DBMIGRATE_REAL_CORPUS"]) if os.environ.get("DBMIGRATE_REAL_CORPUS") else None
needs_real_corpus = pytest.mark.skipif(
    REAL_CORPUS is None or not (REAL_CORPUS / "record.py").exists(),
    reason="DBMIGRATE_REAL_CORPUS is not set: see tests/fixtures/REAL_CORPUS.md")
LOG_TAIL = 3000


def wait_until(condition: Callable[[], object], what: str | Callable[[], str], *, timeout: float,
               gave_up: Callable[[], bool] = lambda: False, log: Callable[[], str] = str,
               interval: float = 0.2) -> None:
    """Return once ``condition()`` is true; raise AssertionError naming ``what`` it waited for.

    It gives up when ``timeout`` seconds pass or when ``gave_up()`` says the condition never will
    hold (the process exited); the message ends with the tail of ``log()``, the process's account.
    """
    deadline = time.monotonic() + timeout
    while True:
        over = gave_up()  # asked first: a process that printed its line and exited still counts
        if condition():
            return
        if over or time.monotonic() > deadline:
            why = "it can no longer happen" if over else f"{timeout:g}s passed"
            text = what() if callable(what) else what
            raise AssertionError(f"gave up waiting for {text} ({why}):\n{log()[-LOG_TAIL:]}")
        time.sleep(interval)


def schema_dump(url: str) -> str:
    """``pg_dump --schema-only`` of a database, without the random \\restrict lines."""
    out = subprocess.run(
        [str(find_pg_bindir("pg_dump") / "pg_dump"), "--schema-only", "--no-owner", url],
        check=True, capture_output=True, text=True,
    ).stdout
    return "\n".join(
        line for line in out.splitlines() if not line.startswith(("\\restrict", "\\unrestrict"))
    )


def query(url: str, sql: str, params=None) -> list[tuple]:
    """Run one query on ``url`` and return its rows."""
    conn = psycopg2.connect(url)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []
    finally:
        conn.close()


def apply_pending(target: Target, settings: Settings, *, upto: str | None = None, **kwargs) -> RunReport:
    """Plan and apply every pending migration (up to ``upto``), as `dbmigrate apply` does."""
    return execute(plan_apply(target, settings, upto=upto), target, settings, **kwargs)


def rollback_last(target: Target, settings: Settings, *, count: int = 1, **kwargs) -> RunReport:
    """Plan and roll back the newest ``count`` applied migrations, as `dbmigrate rollback` does."""
    return execute(plan_rollback(target, settings, count=count), target, settings, **kwargs)


def random_rows(url: str, megabytes: int) -> None:
    """Add a table of ``megabytes`` of incompressible rows, so that a backup takes a while."""
    query(url, "CREATE EXTENSION IF NOT EXISTS pgcrypto; CREATE TABLE blobs AS SELECT g AS id, "
               f"gen_random_bytes(1024) AS data FROM generate_series(1, {megabytes * 1000}) g")
