"""Preflight: what the live database is doing that would block the run, before it starts.

Run before the backup and again right before the apply. It looks for sessions idle in a
transaction for more than a few seconds and queries running longer than lock_timeout, when they
hold or wait for locks on the tables the plan touches (the apply's ALTER would queue behind them,
and the application behind the ALTER), a running pg_dump (its locks would do the same), and
another migration run holding the migration lock. It waits up to ``MIGRATE_PREFLIGHT_WAIT``
seconds for them to end, then stops naming each one: pid, application, state, since when and the
start of its query with every literal masked (a literal may hold a secret).
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Callable

from pglast import parser as pg_parser

from dbcore.connection import Target, raw_session
from dbcore.errors import PreflightFailed
from dbcore.migrate.locking import lock_holder
from dbcore.settings import Settings, duration_seconds

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
QUERY_CHARS = 80

_LOCKS_SQL = """
SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.state, ''),
       a.state_change, a.query_start,
       extract(epoch FROM now() - a.state_change), extract(epoch FROM now() - a.query_start),
       coalesce(a.query, ''), string_agg(DISTINCT c.relname, ', ' ORDER BY c.relname),
       bool_or(NOT l.granted)
FROM pg_locks l
JOIN pg_stat_activity a ON a.pid = l.pid
JOIN pg_class c ON c.oid = l.relation
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE l.locktype = 'relation'
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND a.pid <> pg_backend_pid()
  AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg\\_toast%%'
  AND (%(every)s OR c.relname = ANY(%(tables)s))
  AND coalesce(a.application_name, '') <> 'pg_dump'
GROUP BY a.pid, a.application_name, a.state, a.state_change, a.query_start, a.query
ORDER BY a.pid
"""

_PG_DUMP_SQL = """
SELECT pid, coalesce(state, ''), backend_start, coalesce(query, '')
FROM pg_stat_activity
WHERE datname = current_database() AND application_name = 'pg_dump' AND pid <> pg_backend_pid()
ORDER BY pid
"""

# strings (E'', B'', X'', U&''), dollar quotes and numbers, even cut off by the 80 characters or
# by track_activity_query_size; comments too, which may hold anything
_COMMENT = re.compile(r"--[^\n]*|/\*.*?(\*/|$)", re.S)
_LITERAL = re.compile(r"""\$(?P<tag>[A-Za-z_]\w*)?\$.*?(\$(?P=tag)\$|$)
                        | (?:[EeBbXxNn]|[Uu]&)?'(?:[^']|'')*(?:'|$)
                        | \$\d+
                        | (?<![\w$.])\d+(?:\.\d*)?(?:[eE][-+]?\d+)?""", re.S | re.X)

#: the two points a run looks at the live database; the words are the report's
BEFORE_BACKUP = "before the backup"
BEFORE_APPLY = "before the apply"


def mask_query(query: str, limit: int = QUERY_CHARS) -> str:
    """Return the first ``limit`` characters of ``query`` with every literal replaced by ``?``."""
    text = _COMMENT.sub(" ", query)
    try:
        text = pg_parser.normalize(text)  # PostgreSQL's own scanner: literals become $1, $2...
    except (pg_parser.ParseError, ValueError):
        pass  # cut off or not SQL: the patterns below still mask every literal
    text = _LITERAL.sub(lambda m: m.group(0) if m.group(0)[:1] == "$" and
                        m.group(0)[1:].isdigit() else "?", text)
    text = re.sub(r"\$\d+", "?", text)
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class Blocker:
    """A session that would block or endanger the run."""

    pid: int
    application: str
    state: str
    since: datetime | None
    query: str  # masked, at most 80 characters
    reason: str

    def text(self) -> str:
        since = f" since {self.since:%Y-%m-%d %H:%M:%S %Z}" if self.since else ""
        query = f": {self.query}" if self.query else ""
        return (f"pid {self.pid} ({self.application or 'no application name'}, "
                f"{self.state or 'no state'}{since}, {self.reason}){query}")

    def to_dict(self) -> dict:
        return {"pid": self.pid, "application": self.application, "state": self.state,
                "since": self.since.isoformat() if self.since else None, "query": self.query,
                "reason": self.reason}


@dataclass(frozen=True)
class PreflightReport:
    """The preflight of one stage: clear, after waiting ``waited`` seconds for ``waited_for``."""

    stage: str  # "before the backup" | "before the apply"
    tables: tuple[str, ...] | None  # None: every table of the database
    waited: float = 0.0
    waited_for: tuple[Blocker, ...] = field(default=())

    def to_dict(self) -> dict:
        return {"stage": self.stage, "tables": list(self.tables) if self.tables is not None else None,
                "waited": self.waited, "waited_for": [b.to_dict() for b in self.waited_for]}

    def text(self) -> str:
        """One line: clear, and what it waited for."""
        on = "every table" if self.tables is None else (", ".join(self.tables) or "no table")
        line = (f"preflight {self.stage}: clear (no idle transaction or long query on {on}, no "
                "pg_dump, no other migration run)")
        if self.waited_for:
            line += (f" after waiting {self.waited:.1f}s for "
                     + "; ".join(b.text() for b in self.waited_for))
        return line


def _seconds(value) -> float:
    return float(value) if value is not None else 0.0


def find_blockers(conn, settings: Settings, tables: set[str] | None) -> list[Blocker]:
    """Return the sessions that block the run now (see the module docstring)."""
    idle_limit = settings.preflight_idle_seconds
    # with no lock_timeout at all, a query of a second is already long for a lock holder
    long_query = duration_seconds(settings.lock_timeout) or 1.0
    blockers = []
    with conn.cursor() as cur:
        cur.execute(_LOCKS_SQL, {"every": tables is None, "tables": sorted(tables or ())})
        for pid, app, state, changed, started, idle_s, running_s, query, rels, waiting in cur:
            lock = f"{'waiting for' if waiting else 'holding'} a lock on {rels}"
            if state.startswith("idle in transaction") and _seconds(idle_s) > idle_limit:
                blockers.append(Blocker(pid, app, state, changed, mask_query(query),
                                        f"idle in a transaction for {_seconds(idle_s):.0f}s, {lock}"))
            elif state == "active" and _seconds(running_s) > long_query:
                blockers.append(Blocker(pid, app, state, started, mask_query(query),
                                        f"running for {_seconds(running_s):.0f}s, {lock}"))
        cur.execute(_PG_DUMP_SQL)
        for pid, state, started, query in cur.fetchall():
            blockers.append(Blocker(pid, "pg_dump", state, started, mask_query(query),
                                    "a pg_dump: its locks would queue the migration"))
    holder = lock_holder(conn, settings.advisory_lock_key)
    if holder is not None:
        pid, app, _user, since, _client = holder
        blockers.append(Blocker(pid, app, "holds the migration lock", since, "",
                                "another migration run"))
    return blockers


def preflight(target: Target, settings: Settings, tables: set[str] | None, stage: str, *,
              sleep: Callable[[float], None] = time.sleep) -> PreflightReport:
    """Wait up to ``settings.preflight_wait`` seconds until nothing blocks the run on ``target``.

    Returns the report; raises PreflightFailed naming every blocker still there at the end.
    """
    started = time.monotonic()
    deadline = started + settings.preflight_wait
    seen: dict[int, Blocker] = {}
    with raw_session(target, "dbmigrate preflight") as conn:
        while True:
            blockers = find_blockers(conn, settings, tables)
            if not blockers:
                waited = round(time.monotonic() - started, 1)
                report = PreflightReport(stage, tuple(sorted(tables)) if tables is not None else None,
                                         waited, tuple(seen.values()))
                log.info("%s", report.text())
                return report
            if not seen:
                log.warning("preflight %s: waiting up to %gs for %s", stage,
                            settings.preflight_wait, "; ".join(b.text() for b in blockers))
            for b in blockers:
                seen.setdefault(b.pid, b)
            if time.monotonic() >= deadline:
                what = ("every table" if tables is None
                        else "tables " + (", ".join(sorted(tables)) or "(none)"))
                raise PreflightFailed(
                    f"{len(blockers)} session(s) would block the migration ({what}) and did not "
                    f"end within MIGRATE_PREFLIGHT_WAIT={settings.preflight_wait:g}s: "
                    + "; ".join(b.text() for b in blockers)
                    + ": let them finish or end them (SELECT pg_terminate_backend(pid)), then "
                    "run again")
            sleep(POLL_SECONDS)
