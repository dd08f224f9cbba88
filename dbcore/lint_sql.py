"""Lint rules over the SQL a migration runs, read with PostgreSQL's own parser (pglast).

The SQL comes either from ``migrator.sql("...")`` strings read statically, or from what the
rehearsal captured. A statement on a table created earlier in the same batch is harmless (the
table is empty and nobody else sees it yet); on an existing table the locking rules apply.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator

import pglast
from pglast import ast
from pglast.enums import AlterTableType, ConstrType, ObjectType
from pglast.parser import ParseError

from dbcore.lint_report import Finding, finding

log = logging.getLogger(__name__)

# psycopg2 placeholders (%s, %(name)s) and the escaped %%: PostgreSQL's parser knows $1 and %
_PLACEHOLDER = re.compile(r"%(%|s|\([^)]*\)s)")

RECIPES = {
    "DS101": "build it in a migration of its own that declares atomic = False, as DROP INDEX "
             "CONCURRENTLY IF EXISTS then CREATE INDEX CONCURRENTLY (docs/migrations.md); a small "
             "table may accept the short lock",
    "DS102": "add it with NOT VALID, then run ALTER TABLE ... VALIDATE CONSTRAINT in a later migration",
    "DS103": "add a new column, backfill it in batches, switch the code to it, then drop the old "
             "one (widening varchar(n) or varchar to text does not rewrite)",
    "DS104": "first ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID and VALIDATE CONSTRAINT it, "
             "then SET NOT NULL (PostgreSQL then skips the scan) and drop the CHECK",
    "DS105": "add the new name alongside the old (new column or a view), deploy code that uses it, "
             "then drop the old name in a later migration",
}

#: how a migration leaves the batch transaction (dbcore.runner runs it alone, in autocommit)
NON_ATOMIC_FIX = ("move it to a migration of its own that declares atomic = False at the top "
                  "(DROP INDEX CONCURRENTLY IF EXISTS first, so that a rerun after a failure "
                  "rebuilds an INVALID index)")


def for_parser(sql: str) -> str:
    """Return ``sql`` with psycopg2 placeholders turned into what PostgreSQL's parser reads."""
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(1) == "%" else "$1", sql)


def statements_of(sql: str) -> Iterator[tuple[int, ast.Node]]:
    """Yield (line offset inside ``sql``, statement node); raise pglast's ParseError."""
    text = for_parser(sql)
    for raw in pglast.parse_sql(text):
        yield text[: raw.stmt_location or 0].count("\n"), raw.stmt


def created_tables(statements: Iterable[str]) -> set[str]:
    """Return the tables a batch of SQL creates (unparseable statements are skipped)."""
    tables: set[str] = set()
    for sql in statements:
        try:
            tables |= {n.relation.relname for _, n in statements_of(sql) if isinstance(n, ast.CreateStmt)}
        except ParseError:
            continue
    return tables


def dropped_tables(node: ast.Node) -> list[str]:
    """Return the tables a DROP TABLE statement names (empty for any other statement)."""
    if not isinstance(node, ast.DropStmt) or node.removeType != ObjectType.OBJECT_TABLE:
        return []
    return [names[-1].sval for names in node.objects]


class _Batch:
    """What the statements seen so far did: tables created, tables with a validated CHECK."""

    def __init__(self, existing: set[str] | None, new_tables: Iterable[str], in_transaction: bool):
        self.existing = existing
        self.in_transaction = in_transaction
        self.created = set(new_tables)
        self.validated: set[str] = set()

    def is_existing(self, table: str) -> bool:
        # unknown existing tables (a static lint): anything not created in the batch may be large
        if table in self.created:
            return False
        return self.existing is None or table in self.existing


def lint_sql(
    statements: list[str],
    *,
    existing_tables: set[str] | None = None,
    new_tables: Iterable[str] = (),
    droppable_tables: Iterable[str] = (),
    allow_destructive: bool = False,
    in_transaction: bool = True,
    source: str = "<sql>",
    lines: list[int] | None = None,
) -> list[Finding]:
    """Return the findings on a batch of SQL statements, in order.

    ``existing_tables`` None means unknown: every table not created in the batch counts as
    existing. ``new_tables`` were created earlier in the batch by other means (create_model);
    ``droppable_tables`` may be dropped without an allow (a rollback's own migrate() made them).
    ``in_transaction`` False is for a migration that declares ``atomic = False`` (runs alone, in
    autocommit): CONCURRENTLY is then the recipe, not a mistake.
    ``lines`` gives each statement's line in ``source``; by default its 1-based position.
    """
    batch = _Batch(existing_tables, new_tables, in_transaction)
    droppable = set(droppable_tables)
    findings: list[Finding] = []
    for index, sql in enumerate(statements):
        base = lines[index] if lines else index + 1
        try:
            parsed = list(statements_of(sql))
        except ParseError as exc:
            findings.append(finding("DS100", source, base, f"SQL does not parse ({exc.args[0]}): "
                                    f"fix the statement; PostgreSQL would reject it"))
            continue
        for offset, node in parsed:
            for rule, message, severity in _check(node, batch, droppable, allow_destructive):
                findings.append(finding(rule, source, base + offset, message, severity))
    return findings


def _check(node: ast.Node, batch: _Batch, droppable: set[str], allow_destructive: bool):
    """Yield (rule, message, severity or None) for one statement, and record what it did."""
    if isinstance(node, ast.TransactionStmt):
        yield "DS107", ("transaction control in a migration ends the batch transaction, so a "
                        "later failure can no longer undo what ran before: remove it (every "
                        "migration already runs in the runner's transaction)"), None
    elif isinstance(node, ast.CreateStmt):
        batch.created.add(node.relation.relname)
    elif isinstance(node, ast.IndexStmt):
        yield from _check_index(node, batch)
    elif isinstance(node, ast.DropStmt):
        if node.concurrent and batch.in_transaction:
            yield "DS106", ("DROP INDEX CONCURRENTLY cannot run inside a transaction block: "
                            f"{NON_ATOMIC_FIX}"), None
        for table in dropped_tables(node):
            if table in batch.created or table in droppable:
                continue
            if allow_destructive:
                yield "DM003", f"DROP TABLE {table} destroys its data (allowed explicitly)", "warning"
            else:
                yield "DM003", (f"DROP TABLE {table} destroys its data: set allow_destructive = True "
                                "in the migration (or pass --allow-destructive) if that is intended"), None
    elif isinstance(node, ast.AlterTableStmt) and node.objtype == ObjectType.OBJECT_TABLE:
        yield from _check_alter(node, batch)
    elif isinstance(node, ast.RenameStmt) and node.renameType in (ObjectType.OBJECT_TABLE,
                                                                  ObjectType.OBJECT_COLUMN):
        table = node.relation.relname
        if batch.is_existing(table):
            what = f"table {table}" if node.renameType == ObjectType.OBJECT_TABLE \
                else f"column {table}.{node.subname}"
            yield "DS105", (f"renaming {what} to {node.newname} breaks the running application's "
                            f"queries until it is redeployed: {RECIPES['DS105']}"), None
            if node.renameType == ObjectType.OBJECT_TABLE:
                batch.created.discard(table)


def _check_index(node: ast.IndexStmt, batch: _Batch):
    table = node.relation.relname
    name = node.idxname or "(unnamed)"
    if node.concurrent:
        if batch.in_transaction:
            yield "DS106", (f"CREATE INDEX CONCURRENTLY {name} cannot run inside a transaction "
                            f"block: {NON_ATOMIC_FIX}"), None
    elif batch.is_existing(table):
        yield "DS101", (f"CREATE INDEX {name} on existing table {table} without CONCURRENTLY "
                        f"blocks writes to {table} while it builds: {RECIPES['DS101']}"), None


def _check_alter(node: ast.AlterTableStmt, batch: _Batch):
    table = node.relation.relname
    existing = batch.is_existing(table)
    for cmd in node.cmds:
        if cmd.subtype == AlterTableType.AT_ValidateConstraint:
            batch.validated.add(table)
        elif cmd.subtype == AlterTableType.AT_AddConstraint:
            yield from _check_constraint(cmd.def_, table, existing, batch)
        elif cmd.subtype == AlterTableType.AT_AddColumn:
            for constraint in cmd.def_.constraints or ():
                yield from _check_constraint(constraint, table, existing, batch)
        elif not existing:
            continue
        elif cmd.subtype == AlterTableType.AT_AlterColumnType:
            yield "DS103", (f"ALTER COLUMN {cmd.name} TYPE on {table} rewrites the table under an "
                            f"ACCESS EXCLUSIVE lock: {RECIPES['DS103']}"), None
        elif cmd.subtype == AlterTableType.AT_SetNotNull and table not in batch.validated:
            yield "DS104", (f"SET NOT NULL on {table}.{cmd.name} scans the whole table under an "
                            f"ACCESS EXCLUSIVE lock: {RECIPES['DS104']}"), None


def _check_constraint(constraint: ast.Constraint, table: str, existing: bool, batch: _Batch):
    kind = constraint.contype
    name = constraint.conname or "(unnamed)"
    if kind == ConstrType.CONSTR_CHECK and not constraint.skip_validation:
        batch.validated.add(table)
    if not existing:
        return
    if kind in (ConstrType.CONSTR_FOREIGN, ConstrType.CONSTR_CHECK) and not constraint.skip_validation:
        label = "foreign key" if kind == ConstrType.CONSTR_FOREIGN else "check constraint"
        yield "DS102", (f"{label} {name} on {table} is validated at once, locking {table} while "
                        f"every row is checked: {RECIPES['DS102']}"), None
    elif kind in (ConstrType.CONSTR_UNIQUE, ConstrType.CONSTR_PRIMARY) and not constraint.indexname:
        yield "DS101", (f"constraint {name} on existing table {table} builds its index without "
                        "CONCURRENTLY: build a unique index CONCURRENTLY in an atomic = False "
                        "migration, then ADD CONSTRAINT ... USING INDEX in the next one"), None
