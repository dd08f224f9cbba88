"""The lock verdict: what the live application will feel, one line per table, and the lock budget.

Read from what :class:`dbcore.deploy.locks.LockMeter` measured on the copy. The batch runs in one
transaction, so a lock is held from the statement that takes it to the batch's COMMIT: a table's
window is that span, not its statement's own duration. A table whose writes stay blocked longer
than ``MIGRATE_LOCK_BUDGET`` seconds breaks the budget (rule DL001): a live run stops at the
rehearsal unless the migration allows it (``# dbmigrate: allow DL001`` on the migrator call's
line, or the run is given ``--allow-long-locks``); locally it is a warning.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

from dbcore.deploy.locks import BLOCKS, LockReport, StatementMeasure, TableSize, mode_name, strength
from dbcore.lint.engine import allow_markers
from dbcore.lint.sql_rules import RECIPES, SqlBatch

#: the budget's rule code: `# dbmigrate: allow DL001` on the line of the migrator call
BUDGET_RULE = "DL001"
#: what blocks, from worst to none: the order a table's line is chosen by
_RANK = {"reads and writes": 3, "writes": 2, "rows": 1, "neither": 0}
_GENERIC_FIX = ("split the migration so that the slow statement runs in a deploy of its own, "
                "off-peak, or in an atomic = False migration")


def size_text(n: float) -> str:
    """Return a byte count as people read it (512 B, 1.5 MiB)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def short_sql(sql: str, width: int = 70) -> str:
    """Return one statement on one line, cut at ``width`` characters."""
    text = " ".join(sql.split(" -- params: ")[0].split()).rstrip(";")
    return text if len(text) <= width else text[:width - 4].rstrip() + " ..."


@dataclass(frozen=True)
class TableVerdict:
    """One table: its strongest lock, what it blocks, the window to the commit, and why."""

    table: str
    mode: str  # e.g. AccessExclusiveLock
    blocks: str  # "reads and writes", "writes", "rows" (writes to rows changed), "neither"
    seconds: float  # from the lock's acquisition to the end of its transaction, on the copy
    reading: str  # "rewrite", "scan" (to validate, or an index build), "none"
    why: str
    migration: str  # the migration whose statement took the lock
    statement: int
    sql: str
    started: float  # seconds into the run
    phase: int
    in_transaction: bool
    rows: int = 0  # rows changed (row locks), when blocks == "rows"
    size: TableSize | None = None
    #: the statement that made the window long (the slowest on the table, or in the batch after it)
    cause_migration: str = ""
    cause_statement: int = 0
    cause_sql: str = ""
    cause_elsewhere: bool = False  # that statement works on another table: this one just waits

    @property
    def blocks_writes(self) -> bool:
        return self.blocks != "neither"

    def blocks_text(self) -> str:
        if self.blocks == "rows":
            return f"writes to {self.rows:,} rows blocked"
        return "neither reads nor writes blocked" if self.blocks == "neither" else f"{self.blocks} blocked"

    def line(self, major_note: str = "") -> str:
        """One line: ``table (size): LOCK, what is blocked ~N s, from when to when (why)``."""
        rows = f", ~{self.size.rows:,} rows" if self.size and self.size.rows else ""
        size = f" ({size_text(self.size.bytes)}{rows})" if self.size else ""
        until = ("to the commit of the batch" if self.in_transaction
                 else "to the end of that statement (atomic = False, no transaction)")
        note = f"; {major_note}" if major_note else ""
        return (f"{self.table}{size}: {mode_name(self.mode)}, {self.blocks_text()} "
                f"~{self.seconds:.1f} s, from {self.migration} statement {self.statement} {until} "
                f"({self.why}){note}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class BudgetBreach:
    """A table whose writes stay blocked longer than the budget, and whether that was allowed."""

    verdict: TableVerdict
    budget: float
    allowed_by: str = ""  # "" (not allowed), "--allow-long-locks", or "file.py:LINE"

    def text(self) -> str:
        """One line naming the table, the time, the statement and the safe form."""
        v = self.verdict
        taken = (f"locked by {v.migration}.py statement {v.statement} `{short_sql(v.sql, 50)}`, "
                 if (v.migration, v.statement) != (v.cause_migration, v.cause_statement) else "")
        blocked = "writes blocked" if v.blocks != "rows" else v.blocks_text()
        return (f"{v.table}: {blocked} ~{v.seconds:.1f} s on the copy, over the lock budget "
                f"of {self.budget:g} s ({BUDGET_RULE}), {taken}by {v.cause_migration}.py statement "
                f"{v.cause_statement} `{short_sql(v.cause_sql, 60)}`: {safe_form(v)}; or allow it with "
                f"`# dbmigrate: allow {BUDGET_RULE}` on that migrator call's line, or "
                f"--allow-long-locks")


@dataclass(frozen=True)
class LockVerdict:
    """The verdict of one rehearsal: a line per table, the server it was measured on, the breaches."""

    tables: tuple[TableVerdict, ...]
    budget: float
    breaches: tuple[BudgetBreach, ...] = ()
    rehearsal_major: int = 0
    target_major: int = 0
    server: str = ""
    statements: int = 0

    @property
    def other_major(self) -> bool:
        return bool(self.target_major and self.rehearsal_major
                    and self.target_major != self.rehearsal_major)

    @property
    def stopping(self) -> tuple[BudgetBreach, ...]:
        """The breaches nobody allowed."""
        return tuple(b for b in self.breaches if not b.allowed_by)

    def major_note(self) -> str:
        if not self.other_major:
            return ""
        return f"measured on {self.rehearsal_major}, production runs {self.target_major}"

    def headline(self) -> str:
        """The sentence above the lines: where it was measured, and that the live time scales."""
        where = f" on {self.server}" if self.server else ""
        major = (f"; REHEARSED ON POSTGRESQL {self.rehearsal_major}, PRODUCTION RUNS "
                 f"{self.target_major}: which statements rewrite or scan can differ"
                 if self.other_major else "")
        return (f"Locks measured on the copy{where} (PostgreSQL {self.rehearsal_major}): the live "
                f"times scale with the live server's speed and load; lock budget "
                f"{self.budget:g} s{major}")

    def lines(self) -> list[str]:
        note = self.major_note()
        return [v.line(note if v.reading != "none" or v.blocks != "rows" else "")
                for v in self.tables]

    def to_dict(self) -> dict:
        return {"tables": [v.to_dict() for v in self.tables], "budget": self.budget,
                "breaches": [{"table": b.verdict.table, "seconds": b.verdict.seconds,
                              "allowed_by": b.allowed_by, "text": b.text()} for b in self.breaches],
                "rehearsal_major": self.rehearsal_major, "target_major": self.target_major,
                "server": self.server}


def _blocks(mode: str) -> str:
    return BLOCKS.get(mode, "neither")


def _what_it_did(s: StatementMeasure, table: str, size: TableSize | None) -> tuple[str, str]:
    """Return (reading, words) for what statement ``s`` did to ``table``."""
    of = f" of {size_text(size.bytes)}" if size else ""
    sql = short_sql(s.sql, 60)
    if table in s.rewritten:
        return "rewrite", f"`{sql}` rewrites the table{of}, {s.seconds:.1f} s"
    if table in s.indexed:
        return "scan", f"`{sql}` builds an index over the table{of}, {s.seconds:.1f} s"
    if s.rows.get(table):  # before the scan: an UPDATE's own scan validates nothing
        return "none", f"`{sql}` changes {s.rows[table]:,} rows, {s.seconds:.1f} s"
    if s.scanned.get(table):
        return "scan", f"`{sql}` reads the whole table{of} to validate, {s.seconds:.1f} s"
    return "none", f"`{sql}` changes only the catalog, {s.seconds:.2f} s"


def _table_verdict(table: str, mode: str, blocks: str, taker: StatementMeasure,
                   statements: list[StatementMeasure], end: float,
                   sizes: dict[str, TableSize]) -> TableVerdict:
    """The verdict of ``table`` locked by ``taker`` until ``end`` (seconds since the start)."""
    size = sizes.get(table)
    window = [s for s in statements if s.phase == taker.phase and s.started >= taker.started]
    on_table = [s for s in window if table in s.locks or table in s.rewritten
                or table in s.indexed or s.scanned.get(table) or s.rows.get(table)] or [taker]
    heaviest = max(on_table, key=lambda s: s.seconds)
    reading = "none"
    for s in on_table:
        r, _ = _what_it_did(s, table, size)
        reading = max(reading, r, key=("none", "scan", "rewrite").index)
    _, why = _what_it_did(heaviest, table, size)
    slowest = max(window, key=lambda s: s.seconds)
    cause = heaviest
    seconds = max(0.0, end - taker.started)
    if slowest is not heaviest and slowest.seconds > max(2 * heaviest.seconds, 0.01):
        why += (f"; held to the commit while {slowest.migration} `{short_sql(slowest.sql, 50)}` "
                f"runs, {slowest.seconds:.1f} s")
        cause = slowest
    rows = sum(s.rows.get(table, 0) for s in window)
    return TableVerdict(table, mode, blocks, round(seconds, 3), reading, why, taker.migration,
                        taker.number, taker.sql, taker.started, taker.phase, taker.in_transaction,
                        rows, size, cause.migration, cause.number, cause.sql, cause is not heaviest)


def table_verdicts(report: LockReport) -> list[TableVerdict]:
    """Return one verdict per table the batch locked: its worst lock (what it blocks, then how long)."""
    statements = list(report.statements)
    ends = report.phase_ends
    best: dict[str, TableVerdict] = {}
    for s in statements:
        end = ends.get(s.phase, s.started + s.seconds)
        if not s.in_transaction:
            end = s.started + s.seconds
        taken = dict(s.locks)
        for table in s.rows:
            taken.setdefault(table, "RowExclusiveLock")
        for table, mode in taken.items():
            blocks = _blocks(mode)
            if blocks == "neither" and s.rows.get(table):
                blocks = "rows"
            v = _table_verdict(table, mode, blocks, s, statements, end, report.sizes)
            old = best.get(table)
            if old is None or (_RANK[v.blocks], v.seconds) > (_RANK[old.blocks], old.seconds):
                best[table] = v
            elif old.blocks == v.blocks and strength(v.mode) > strength(old.mode):
                best[table] = v
    return sorted(best.values(), key=lambda v: (-_RANK[v.blocks], -v.seconds, v.table))


def safe_form(v: TableVerdict) -> str:
    """Return the safe way to write the statement that blocks ``v``'s table (the lint's recipes)."""
    if v.cause_elsewhere:
        return (f"safe form: move {v.migration} to a deploy of its own, apart from "
                f"{v.cause_migration} (one transaction holds every lock to its commit)")
    sql = v.cause_sql or v.sql
    for f in SqlBatch(existing_tables=None).check(sql, 1):
        if f.rule in RECIPES:
            return f"safe form ({f.rule}): {RECIPES[f.rule]}"
    if v.reading == "rewrite":
        return ("safe form: add the column with no default or a constant one (stored once, no "
                "rewrite), then fill it in batches")
    if v.blocks == "rows":
        return ("safe form: update in batches of a few thousand rows, each committed, in an "
                "atomic = False migration")
    return f"safe form: {_GENERIC_FIX}"


def allowed_lines(path: Path) -> dict[int, set[str]]:
    """Return {line: rules} of the ``# dbmigrate: allow RULE`` markers in a migration file (as the lint reads them)."""
    try:
        return allow_markers(path.read_text(encoding="utf-8"))
    except OSError:
        return {}


def judge(report: LockReport, *, budget: float, files: dict[str, Path],
          call_sites: dict[tuple[str, int], int] | None = None, allow_long_locks: bool = False,
          target_major: int = 0, server: str = "") -> LockVerdict:
    """Return the verdict of ``report``: every table's line, and the tables over ``budget``.

    ``files`` maps a migration's name to its file (to read its allow markers); ``call_sites``
    maps (migration, statement number) to the line of the migrator call that queued it (default:
    the lines the runner recorded): then only a marker on that line allows the breach, else one
    anywhere in the file.
    """
    if call_sites is None:
        call_sites = {(s.migration, s.number): s.line for s in report.statements if s.line}
    tables = table_verdicts(report)
    breaches = []
    for v in tables:
        if not v.blocks_writes or v.seconds <= budget:
            continue
        by = ""
        if allow_long_locks:
            by = "--allow-long-locks"
        else:
            by = _allowed_by(v, files, call_sites or {})
        breaches.append(BudgetBreach(v, budget, by))
    return LockVerdict(tuple(tables), budget, tuple(breaches), report.server_major, target_major,
                       server, len(report.statements))


def _allowed_by(v: TableVerdict, files: dict[str, Path],
                call_sites: dict[tuple[str, int], int]) -> str:
    """Return ``file:line`` of the DL001 allow on the statement that took the lock or made it long."""
    for migration, number in ((v.migration, v.statement), (v.cause_migration, v.cause_statement)):
        if migration not in files:
            continue
        marks = allowed_lines(files[migration])
        line = call_sites.get((migration, number))
        hit = [n for n in ([line] if line else sorted(marks)) if BUDGET_RULE in marks.get(n, ())]
        if hit:
            return f"{files[migration].name}:{hit[0]}"
    return ""


def stop_message(verdict: LockVerdict) -> str:
    """The run's stop reason: the first breach nobody allowed, and how many more there are."""
    stopping = verdict.stopping
    more = f" (and {len(stopping) - 1} more table(s): see the plan)" if len(stopping) > 1 else ""
    return stopping[0].text() + more


def describe_breaches(breaches: Iterable[BudgetBreach]) -> list[str]:
    """Return one line per breach: stopped, allowed (by what), or a local warning."""
    return [f"{b.text().split(': ', 1)[0]}: over the {b.budget:g} s lock budget, allowed by "
            f"{b.allowed_by}" if b.allowed_by else b.text() for b in breaches]
