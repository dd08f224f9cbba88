"""Prove candidate indexes with HypoPG on a copy: the planner's cost of every query before and after.

Runs on a copy (a rehearsal scratch database), never on the live database: VACUUM ANALYZE first
(a fresh restore has no statistics and no page marked all-visible), then each candidate is created
hypothetically (``hypopg_create_index``: nothing is built, only the planner sees it) and every
query on its table is EXPLAINed again.

Queries with ``$n`` parameters (pg_stat_statements' normalised texts) are planned as PostgreSQL's
generic plan: ``PREPARE`` under ``plan_cache_mode = force_generic_plan``, then ``EXPLAIN EXECUTE``
with NULL arguments (a generic plan never looks at them). PostgreSQL 15 has no ``EXPLAIN
(GENERIC_PLAN)``. We chose the generic plan over values sampled from the column's statistics
because it is the plan of a typical value: an equality on a column is estimated at 1/n_distinct
of the rows, so a column of three statuses is (rightly) not worth an index, while a sampled
value would be a rare or a common one by chance. Its limit: a range (``created_at > $1``) is
estimated at a third of the table, so an index that helps only narrow ranges is not proven this
way: give such queries with real values in ``--queries FILE``.

The choice is greedy (like Dexter): the candidate that saves the largest share of the workload's
time is kept (hypothetically), the others are measured again beside it, until none lowers any
query's cost by the margin.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import psycopg2
from psycopg2 import sql as pgsql

from dbcore.advise.candidates import Candidate, candidates_of, param_count, tables_of
from dbcore.advise.workload import Query, Workload
from dbcore.connection import Target, connect_raw, raw_session
from dbcore.errors import ConfigError, DbcoreError
from dbcore.redact import error_line

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Helped:
    """One query an index helps: its cost before and after (the planner's units)."""

    query: Query
    share: float | None  # of the database's recorded time
    before: float
    after: float

    @property
    def saving(self) -> float:
        return 1.0 - self.after / self.before if self.before else 0.0


@dataclass(frozen=True)
class Proposal:
    """An index worth proposing: what it helps, its estimated size, the table's writes."""

    candidate: Candidate
    helped: tuple[Helped, ...]
    size_bytes: int
    writes: str = ""  # the write cost, as a person reads it

    @property
    def share(self) -> float | None:
        shares = [h.share for h in self.helped if h.share is not None]
        return sum(shares) if shares else None


@dataclass
class Advice:
    """Every proposal, with what was read and what could not be planned."""

    proposals: list[Proposal] = field(default_factory=list)
    queries: int = 0
    planned: int = 0
    candidates: int = 0
    skipped_existing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class _Planner:
    """EXPLAIN on the copy, read-only, with HypoPG's hypothetical indexes."""

    def __init__(self, copy: Target):
        self.copy = copy
        self.conn = connect_raw(copy, "dbmigrate suggest-indexes")
        self.cur = self.conn.cursor()

    def close(self) -> None:
        self.conn.close()

    def cost(self, query: Query) -> tuple[float, str] | None:
        """Return (total cost, plan JSON text) of ``query``, or None when it cannot be planned."""
        try:
            params = param_count(query.sql)
            if params:
                self.cur.execute(pgsql.SQL("PREPARE dm_advise AS {}").format(pgsql.SQL(query.sql)))
                try:
                    args = ", ".join(["NULL"] * params)
                    self.cur.execute(f"EXPLAIN (FORMAT JSON) EXECUTE dm_advise({args})")
                    plan = self.cur.fetchone()[0]
                finally:
                    self.cur.execute("DEALLOCATE dm_advise")
            else:
                self.cur.execute(pgsql.SQL("EXPLAIN (FORMAT JSON) {}").format(pgsql.SQL(query.sql)))
                plan = self.cur.fetchone()[0]
        except (psycopg2.Error, ValueError, IndexError) as exc:
            log.info("cannot plan %s: %s", query.short(60), error_line(exc, self.copy.password))
            return None
        if isinstance(plan, str):
            plan = json.loads(plan)
        return float(plan[0]["Plan"]["Total Cost"]), json.dumps(plan)

    def hypothetical(self, candidate: Candidate) -> int:
        self.cur.execute("SELECT indexrelid FROM hypopg_create_index(%s)", (candidate.definition,))
        return int(self.cur.fetchone()[0])

    def drop(self, oid: int) -> None:
        self.cur.execute("SELECT hypopg_drop_index(%s)", (oid,))

    def size(self, oid: int) -> int:
        self.cur.execute("SELECT hypopg_relation_size(%s)", (oid,))
        return int(self.cur.fetchone()[0])


def prepare_copy(copy: Target, where: str) -> None:
    """VACUUM ANALYZE the copy and create HypoPG there; raise ConfigError saying how to install it."""
    conn = connect_raw(copy, "dbmigrate suggest-indexes")
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'hypopg'")
            if cur.fetchone() is None:
                cur.execute("SHOW server_version_num")
                major = int(cur.fetchone()[0]) // 10000
                raise ConfigError(
                    f"HypoPG is not installed on {where}: install it there (Debian: apt-get "
                    f"install postgresql-{major}-hypopg; `make setup` does it locally), then run again")
            cur.execute("CREATE EXTENSION IF NOT EXISTS hypopg")
            # a fresh restore has no statistics, and no page marked all-visible (which would make
            # every index-only scan look as dear as a heap scan): VACUUM ANALYZE it, as production is
            cur.execute("VACUUM (ANALYZE)")
    except psycopg2.Error as exc:
        raise DbcoreError(f"cannot prepare the copy on {where}: "
                          f"{error_line(exc, copy.password)}") from None
    finally:
        conn.close()


_COLUMNS = """
    SELECT c.relname, a.attname
    FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE c.relkind IN ('r', 'p', 'm') AND a.attnum > 0 AND NOT a.attisdropped
      AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%%'
"""
_DISTINCT = """
    SELECT s.tablename, s.attname,
           CASE WHEN s.n_distinct < 0 THEN -s.n_distinct * greatest(c.reltuples, 0) ELSE s.n_distinct END
    FROM pg_stats s JOIN pg_class c ON c.relname = s.tablename
    JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = s.schemaname
    WHERE s.schemaname NOT IN ('pg_catalog', 'information_schema')
"""
#: plain-column btree indexes: (table, columns in order); partial and expression ones are left out
_INDEXES = """
    SELECT t.relname, array_agg(a.attname ORDER BY k.ord)
    FROM pg_index x
    JOIN pg_class t ON t.oid = x.indrelid
    JOIN pg_class i ON i.oid = x.indexrelid
    JOIN pg_am am ON am.oid = i.relam AND am.amname = 'btree'
    CROSS JOIN LATERAL unnest(x.indkey) WITH ORDINALITY AS k(attnum, ord)
    JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
    WHERE x.indpred IS NULL AND x.indisvalid AND k.ord <= x.indnkeyatts
    GROUP BY x.indexrelid, t.relname
    HAVING bool_and(k.attnum > 0)
"""


Indexes = list[tuple[str, tuple[str, ...]]]


def catalog(copy: Target) -> tuple[dict[str, set[str]], dict[tuple[str, str], float], Indexes]:
    """Return the copy's columns by table, distinct estimates and plain btree indexes."""
    with raw_session(copy, "dbmigrate suggest-indexes") as conn, conn.cursor() as cur:
        cur.execute(_COLUMNS)
        columns: dict[str, set[str]] = {}
        for table, col in cur.fetchall():
            columns.setdefault(table, set()).add(col)
        cur.execute(_DISTINCT)
        distinct = {(t, c): float(d or 0) for t, c, d in cur.fetchall()}
        cur.execute(_INDEXES)
        indexes = [(t, tuple(cols)) for t, cols in cur.fetchall()]
    return columns, distinct, indexes


def covered_by_existing(candidate: Candidate, indexes: Indexes) -> str | None:
    """Return the existing index columns ``candidate`` is a prefix of (or equal to), else None."""
    for table, cols in indexes:
        if table == candidate.table and cols[: len(candidate.columns)] == candidate.columns:
            return f"{table} ({', '.join(cols)})"
    return None


@dataclass
class _Baseline:
    """The workload as planned without new indexes: each query's cost, the queries of each table
    and the candidates to try."""

    current: dict[int, float] = field(default_factory=dict)  # query index -> cost now
    by_table: dict[str, list[int]] = field(default_factory=dict)
    candidates: list[Candidate] = field(default_factory=list)


def _baseline(planner: _Planner, workload: Workload, copy: Target, advice: Advice) -> _Baseline:
    columns, distinct, indexes = catalog(copy)
    base = _Baseline()
    for i, query in enumerate(workload.queries):
        planned = planner.cost(query)
        if planned is None:
            continue
        base.current[i] = planned[0]
        for table in tables_of(query.sql):
            base.by_table.setdefault(table, []).append(i)
        for cand in candidates_of(query.sql, columns, distinct):
            existing = covered_by_existing(cand, indexes)
            if existing:
                line = f"{cand.definition}: already indexed by {existing}"
                if line not in advice.skipped_existing:
                    advice.skipped_existing.append(line)
            elif cand not in base.candidates:
                base.candidates.append(cand)
    advice.planned, advice.candidates = len(base.current), len(base.candidates)
    if len(base.current) < len(workload.queries):
        advice.notes.append(f"{len(workload.queries) - len(base.current)} of {len(workload.queries)} "
                            "queries could not be planned on the copy (a table or a column it "
                            "lacks, a parameter whose type cannot be told): skipped")
    return base


def advise(workload: Workload, copy: Target, *, margin: float,
           writes: dict[str, str] | None = None) -> Advice:
    """Return the indexes worth proposing for ``workload``, proven on ``copy`` (prepared already).

    ``margin``: the fraction (0.5 = 50%) by which an index must lower a query's cost for that
    query to count as helped; an index that helps no query is never proposed.
    """
    advice = Advice(queries=len(workload.queries))
    advice.notes += workload.notes
    planner = _Planner(copy)
    try:
        planner.cur.execute("SET default_transaction_read_only = on")
        planner.cur.execute("SET plan_cache_mode = force_generic_plan")
        base = _baseline(planner, workload, copy, advice)
        while True:  # greedy: keep the best, measure the rest again beside it
            best = _best(planner, workload, base, margin,
                         [c for c in base.candidates if c not in {p.candidate for p in advice.proposals}])
            if best is None:
                break
            cand, helped = best
            oid = planner.hypothetical(cand)  # kept: the next round is measured beside it
            for h in helped:
                base.current[workload.queries.index(h.query)] = h.after
            advice.proposals.append(Proposal(cand, tuple(helped), planner.size(oid),
                                             (writes or {}).get(cand.table, "")))
    finally:
        planner.close()
    return advice


def _best(planner: _Planner, workload: Workload, base: _Baseline, margin: float,
          candidates: list[Candidate]) -> tuple[Candidate, list[Helped]] | None:
    """Return the candidate saving the largest share of the workload's time, and what it helps."""
    best: tuple[float, Candidate, list[Helped]] | None = None
    for cand in candidates:
        helped = _measure(planner, workload, cand, base.by_table.get(cand.table, []), base.current,
                          margin)
        benefit = sum(workload.weight(h.query) * h.saving for h in helped)
        if helped and (best is None or benefit > best[0]):
            best = (benefit, cand, helped)
    return None if best is None else (best[1], best[2])


def _measure(planner: _Planner, workload: Workload, cand: Candidate, indices: list[int],
             current: dict[int, float], margin: float) -> list[Helped]:
    """Return the queries ``cand`` helps by the margin (its hypothetical index used by the plan)."""
    oid = planner.hypothetical(cand)
    try:
        helped = []
        for i in indices:
            planned = planner.cost(workload.queries[i])
            if planned is None:
                continue
            cost, plan = planned
            if f"<{oid}>" in plan and cost <= current[i] * (1.0 - margin):
                q = workload.queries[i]
                helped.append(Helped(q, workload.share(q), current[i], cost))
        return helped
    finally:
        planner.drop(oid)


_WRITES = """
    SELECT s.relname, s.n_tup_ins, s.n_tup_upd, s.n_tup_del, s.n_live_tup,
           (SELECT count(*) FROM pg_index x WHERE x.indrelid = s.relid),
           extract(epoch FROM now() - coalesce(d.stats_reset, pg_postmaster_start_time()))
    FROM pg_stat_user_tables s, pg_stat_database d
    WHERE d.datname = current_database()
"""


def _rate(count: int, seconds: float) -> str:
    per_hour = count * 3600.0 / seconds if seconds > 0 else 0.0
    if per_hour >= 1_000_000:
        return f"{per_hour / 1_000_000:.1f}M/h"
    if per_hour >= 1000:
        return f"{per_hour / 1000:.1f}k/h"
    return f"{per_hour:.0f}/h"


def write_costs(target: Target) -> dict[str, str]:
    """Return, per table of the target (read-only), its write rate and how many indexes each write
    already maintains: what one more index adds to every insert and update."""
    with raw_session(target, "dbmigrate suggest-indexes") as conn, conn.cursor() as cur:
        cur.execute("SET default_transaction_read_only = on")
        cur.execute(_WRITES)
        rows = cur.fetchall()
    costs = {}
    for table, ins, upd, dele, live, n_indexes, seconds in rows:
        seconds = float(seconds or 0)
        costs[table] = (f"{_rate(ins, seconds)} inserts, {_rate(upd, seconds)} updates, "
                        f"{_rate(dele, seconds)} deletes; {n_indexes} index(es) already; "
                        f"{live} rows (rates since the statistics were reset, or the server started)")
    return costs
