"""Lint rules over the SQL a migration runs, read with PostgreSQL's own parser (pglast).

The SQL comes either from ``migrator.sql("...")`` strings read statically, or from what the
rehearsal captured. A statement on a table created earlier in the same batch is harmless (the
table is empty and nobody else sees it yet); on an existing table the locking rules apply.
A ``SqlBatch`` is the state of one transaction seen in order: ``lint.py`` feeds it the
migrator's own operations and the SQL strings in source order, so a drop and a later re-create
of the same table are judged as they happen.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import pglast
from pglast import ast
from pglast.enums import (
    AlterTableType,
    ConstrType,
    DropBehavior,
    NullTestType,
    ObjectType,
    TransactionStmtKind,
)
from pglast.parser import ParseError

from dbcore.lint.report import Finding, finding

# psycopg2 placeholders (%s, %(name)s) and the escaped %%: PostgreSQL's parser knows $1 and %
_PLACEHOLDER = re.compile(r"%(%|s|\([^)]*\)s)")

RECIPES = {
    "DS101": "build it in a migration of its own that declares atomic = False, as DROP INDEX "
             "CONCURRENTLY IF EXISTS then CREATE INDEX CONCURRENTLY (docs/migrations.md); a small "
             "table may accept the short lock",
    "DS102": "add it with NOT VALID, then run ALTER TABLE ... VALIDATE CONSTRAINT in a later "
             "deploy (the whole batch is one transaction, so a VALIDATE in the same deploy runs "
             "under the ADD's lock)",
    "DS103": "add a new column, backfill it in batches, switch the code to it, then drop the old "
             "one (widening varchar(n) or varchar to text does not rewrite)",
    "DS104": "in an earlier deploy ADD CONSTRAINT ... CHECK (col IS NOT NULL) NOT VALID, then "
             "VALIDATE CONSTRAINT it in a later deploy; only then SET NOT NULL (PostgreSQL skips "
             "the scan) and drop the CHECK",
    "DS105": "add the new name alongside the old (new column or a view), deploy code that uses it, "
             "then drop the old name in a later migration",
}

#: how a migration leaves the batch transaction (dbcore.migrate.runner runs it alone, in autocommit)
NON_ATOMIC_FIX = ("move it to a migration of its own that declares atomic = False at the top "
                  "(DROP INDEX CONCURRENTLY IF EXISTS first, so that a rerun after a failure "
                  "rebuilds an INVALID index)")

_ALLOW = ("set allow_destructive = True in the migration (or pass --allow-destructive, or allow "
          "the line with # dbmigrate: allow DM003) if that is intended")
# `with database.atomic():` nested in the batch: SAVEPOINT, RELEASE, ROLLBACK TO
_SAVEPOINTS = {TransactionStmtKind.TRANS_STMT_SAVEPOINT, TransactionStmtKind.TRANS_STMT_RELEASE,
               TransactionStmtKind.TRANS_STMT_ROLLBACK_TO}
# column types that bring their own default (nextval)
_SERIAL_TYPES = {"serial", "bigserial", "smallserial", "serial2", "serial4", "serial8"}


def for_parser(sql: str) -> str:
    """Return ``sql`` with psycopg2 placeholders turned into what PostgreSQL's parser reads."""
    return _PLACEHOLDER.sub(lambda m: "%" if m.group(1) == "%" else "$1", sql)


def statements_of(sql: str) -> Iterator[tuple[int, ast.Node]]:
    """Yield (line offset inside ``sql``, statement node); raise pglast's ParseError."""
    text = for_parser(sql)
    for raw in pglast.parse_sql(text):
        if raw.stmt is not None:  # every statement the parser returns has one
            yield text[: raw.stmt_location or 0].count("\n"), raw.stmt


def dropped_tables(node: ast.Node) -> list[str]:
    """Return the tables a DROP TABLE statement names (empty for any other statement)."""
    if not isinstance(node, ast.DropStmt) or node.removeType != ObjectType.OBJECT_TABLE:
        return []
    return [names[-1].sval for names in node.objects]


class SqlBatch:
    """What one transaction did so far, and the rules applied to each step of it in order.

    ``existing_tables`` None means unknown: every table not created in the batch counts as
    existing. ``new_tables`` were created before the first statement by other means;
    ``droppable_tables`` may be dropped without an allow (a rollback's own migrate() made them);
    ``validated_not_null`` are (table, column) pairs with a CHECK (col IS NOT NULL) validated
    before the batch began (a caller that read the catalog may know them).
    ``in_transaction`` False is for a migration that declares ``atomic = False``.
    """

    def __init__(self, *, existing_tables: set[str] | None = None, new_tables: Iterable[str] = (),
                 droppable_tables: Iterable[str] = (), allow_destructive: bool = False,
                 in_transaction: bool = True, source: str = "<sql>",
                 validated_not_null: Iterable[tuple[str, str]] = (),
                 droppable_columns: Iterable[tuple[str, str]] = ()):
        self.existing = existing_tables
        self.created = set(new_tables)
        self.droppable = set(droppable_tables)
        #: (table, column) added in the batch, and those a rollback may drop (its migrate() added them)
        self.added_columns: set[tuple[str, str]] = set()
        self.droppable_columns = set(droppable_columns)
        self.allow_destructive = allow_destructive
        self.in_transaction = in_transaction
        self.source = source
        self.validated_not_null = set(validated_not_null)
        self.checks_in_batch: set[tuple[str, str]] = set()  # CHECK (col IS NOT NULL) added here
        self.not_valid: dict[str, str] = {}  # constraint name -> table, added NOT VALID here

    def is_existing(self, table: str) -> bool:
        # unknown existing tables (a static lint): anything not created in the batch may be large
        if table in self.created:
            return False
        return self.existing is None or table in self.existing

    def create(self, table: str, *, if_not_exists: bool = False) -> None:
        """Record a table created in the batch (IF NOT EXISTS only when it surely did not exist)."""
        if not if_not_exists or (self.existing is not None and table not in self.existing):
            self.created.add(table)

    def rename(self, table: str, new_name: str) -> None:
        if table in self.created:
            self.created.discard(table)
            self.created.add(new_name)

    def drop(self, table: str, what: str | None = None) -> Iterator[tuple[str, str, str | None]]:
        """Yield the DM003 finding of dropping ``table`` (none for a table this batch made)."""
        if table in self.created or table in self.droppable:
            self.created.discard(table)
            return
        yield self._destroys(what or f"DROP TABLE {table}", "data")

    def add_column(self, table: str, column: str) -> None:
        """Record a column added in the batch (dropping it again destroys nothing)."""
        self.added_columns.add((table, column))

    def drop_column(self, table: str, column: str, what: str | None = None
                    ) -> Iterator[tuple[str, str, str | None]]:
        """Yield the DM003 finding of dropping ``table.column`` (none for one this batch made)."""
        # "*": columns added that the lint could not name (add_columns(M, **fields))
        if (table in self.created or {(table, column), (table, "*")} & self.added_columns
                or {(table, column), (table, "*")} & self.droppable_columns or table in self.droppable):
            self.added_columns.discard((table, column))
            return
        yield self._destroys(what or f"DROP COLUMN {table}.{column}", "values")

    def _destroys(self, what: str, lost: str) -> tuple[str, str, str | None]:
        """The DM003 finding: a warning when allowed explicitly, else the rule's error."""
        if self.allow_destructive:
            return "DM003", f"{what} destroys its {lost} (allowed explicitly)", "warning"
        return "DM003", f"{what} destroys its {lost}: {_ALLOW}", None

    def check(self, sql: str, line: int) -> list[Finding]:
        """Return the findings of one SQL string at ``line`` of the source, and record what it did."""
        try:
            parsed = list(statements_of(sql))
        except ParseError as exc:
            return [finding("DS100", self.source, line, f"SQL does not parse ({exc.args[0]}): "
                            "fix the statement; PostgreSQL would reject it")]
        return [finding(rule, self.source, line + offset, message, severity)
                for offset, node in parsed for rule, message, severity in _check(node, self)]


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
    validated_not_null: Iterable[tuple[str, str]] = (),
) -> list[Finding]:
    """Return the findings on a batch of SQL statements, in order (see ``SqlBatch``).

    ``lines`` gives each statement's line in ``source``; by default its 1-based position.
    """
    batch = SqlBatch(existing_tables=existing_tables, new_tables=new_tables,
                     droppable_tables=droppable_tables, allow_destructive=allow_destructive,
                     in_transaction=in_transaction, source=source,
                     validated_not_null=validated_not_null)
    findings: list[Finding] = []
    for index, sql in enumerate(statements):
        findings += batch.check(sql, lines[index] if lines else index + 1)
    return findings


def _check(node: ast.Node, batch: SqlBatch):
    """Yield (rule, message, severity or None) for one statement, and record what it did."""
    if isinstance(node, ast.TransactionStmt):
        yield from _check_transaction(node)
    elif isinstance(node, ast.CreateStmt):
        batch.create(node.relation.relname, if_not_exists=bool(node.if_not_exists))
    elif isinstance(node, ast.CreateTableAsStmt) and node.objtype in (ObjectType.OBJECT_TABLE,
                                                                      ObjectType.OBJECT_MATVIEW):
        batch.create(node.into.rel.relname, if_not_exists=bool(node.if_not_exists))
    elif isinstance(node, ast.IndexStmt):
        yield from _check_index(node, batch)
    elif isinstance(node, ast.DropStmt):
        yield from _check_drop(node, batch)
    elif isinstance(node, ast.TruncateStmt):
        for relation in node.relations or ():
            yield from batch.drop(relation.relname, f"TRUNCATE {relation.relname}")
    elif isinstance(node, ast.AlterTableStmt) and node.objtype == ObjectType.OBJECT_TABLE:
        yield from _check_alter(node, batch)
    elif isinstance(node, ast.RenameStmt) and node.renameType in (
            ObjectType.OBJECT_TABLE, ObjectType.OBJECT_COLUMN, ObjectType.OBJECT_MATVIEW):
        table = node.relation.relname
        if batch.is_existing(table) and node.renameType != ObjectType.OBJECT_MATVIEW:
            what = f"table {table}" if node.renameType == ObjectType.OBJECT_TABLE \
                else f"column {table}.{node.subname}"
            yield "DS105", (f"renaming {what} to {node.newname} breaks the running application's "
                            f"queries until it is redeployed: {RECIPES['DS105']}"), None
        if node.renameType != ObjectType.OBJECT_COLUMN:
            batch.rename(table, node.newname)


def _check_transaction(node: ast.TransactionStmt):
    if node.kind in _SAVEPOINTS:
        return  # a savepoint lives and dies inside the batch transaction: it ends nothing
    yield "DS107", ("transaction control in a migration ends the batch transaction, so a "
                    "later failure can no longer undo what ran before: remove it (every "
                    "migration already runs in the runner's transaction)"), None


def _check_drop(node: ast.DropStmt, batch: SqlBatch):
    if node.concurrent and batch.in_transaction:
        yield "DS106", ("DROP INDEX CONCURRENTLY cannot run inside a transaction block: "
                        f"{NON_ATOMIC_FIX}"), None
    for table in dropped_tables(node):
        yield from batch.drop(table)
    if node.removeType == ObjectType.OBJECT_SCHEMA and node.behavior == DropBehavior.DROP_CASCADE:
        for names in node.objects:
            yield from batch.drop(f"schema {names.sval}",
                                  f"DROP SCHEMA {names.sval} CASCADE (with every table in it)")


def _check_index(node: ast.IndexStmt, batch: SqlBatch):
    table = node.relation.relname
    name = node.idxname or "(unnamed)"
    if node.concurrent:
        if batch.in_transaction:
            yield "DS106", (f"CREATE INDEX CONCURRENTLY {name} cannot run inside a transaction "
                            f"block: {NON_ATOMIC_FIX}"), None
    elif batch.is_existing(table):
        yield "DS101", (f"CREATE INDEX {name} on existing table {table} without CONCURRENTLY "
                        f"blocks writes to {table} while it builds: {RECIPES['DS101']}"), None


def _not_null_column(constraint: ast.Constraint) -> str | None:
    """Return the column of a ``CHECK (col IS NOT NULL)`` (None for any other constraint)."""
    expr = constraint.raw_expr
    if (constraint.contype == ConstrType.CONSTR_CHECK and isinstance(expr, ast.NullTest)
            and expr.nulltesttype == NullTestType.IS_NOT_NULL and isinstance(expr.arg, ast.ColumnRef)
            and isinstance(expr.arg.fields[-1], ast.String)):
        return expr.arg.fields[-1].sval
    return None


def _check_alter(node: ast.AlterTableStmt, batch: SqlBatch):
    table = node.relation.relname
    existing = batch.is_existing(table)
    for cmd in node.cmds:
        if cmd.subtype == AlterTableType.AT_ValidateConstraint:
            if batch.not_valid.get(cmd.name) == table:
                yield "DS102", (f"constraint {cmd.name} on {table} is validated in the same "
                                "transaction that added it NOT VALID: the ADD's lock is held to "
                                "the end of the transaction, so nothing is gained; validate it "
                                "in a later deploy"), None
        elif cmd.subtype == AlterTableType.AT_AddConstraint:
            yield from _check_constraint(cmd.def_, table, existing, batch)
        elif cmd.subtype == AlterTableType.AT_AddColumn:
            batch.add_column(table, cmd.def_.colname)
            yield from _check_added_column(cmd.def_, table, existing, batch)
        elif cmd.subtype == AlterTableType.AT_DropColumn:
            yield from batch.drop_column(table, cmd.name)
        elif not existing:
            continue
        elif cmd.subtype == AlterTableType.AT_AlterColumnType:
            yield "DS103", (f"ALTER COLUMN {cmd.name} TYPE on {table} rewrites the table under an "
                            f"ACCESS EXCLUSIVE lock: {RECIPES['DS103']}"), None
        elif cmd.subtype == AlterTableType.AT_SetNotNull:
            if (table, cmd.name) in batch.validated_not_null:
                continue
            same_batch = (" (the CHECK added in this same transaction does not help: its lock is "
                          "held until commit)") if (table, cmd.name) in batch.checks_in_batch else ""
            yield "DS104", (f"SET NOT NULL on {table}.{cmd.name} scans the whole table under an "
                            f"ACCESS EXCLUSIVE lock{same_batch}: {RECIPES['DS104']}"), None


def _check_added_column(column: ast.ColumnDef, table: str, existing: bool, batch: SqlBatch):
    kinds = {c.contype for c in column.constraints or ()}
    type_name = column.typeName.names[-1].sval if column.typeName else ""
    fills_itself = kinds & {ConstrType.CONSTR_DEFAULT, ConstrType.CONSTR_IDENTITY,
                            ConstrType.CONSTR_GENERATED} or type_name in _SERIAL_TYPES
    if existing and kinds & {ConstrType.CONSTR_NOTNULL, ConstrType.CONSTR_PRIMARY} and not fills_itself:
        yield "DM004", (f"ADD COLUMN {column.colname} NOT NULL without a DEFAULT on existing table "
                        f"{table} fails as soon as {table} has rows: add it nullable, fill it with "
                        "UPDATE, then SET NOT NULL (migrations/004_fix_sourcedir_language.py)"), None
    for constraint in column.constraints or ():
        yield from _check_constraint(constraint, table, existing, batch)


def _check_constraint(constraint: ast.Constraint, table: str, existing: bool, batch: SqlBatch):
    kind = constraint.contype
    name = constraint.conname or "(unnamed)"
    column = _not_null_column(constraint)
    if column:
        batch.checks_in_batch.add((table, column))
    if constraint.skip_validation and constraint.conname:
        batch.not_valid[constraint.conname] = table
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
