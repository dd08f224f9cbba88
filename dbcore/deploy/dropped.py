"""The columns a plan drops, and how many values each held: counted on the rehearsal's copy.

Dropping a column destroys its values as surely as dropping a table destroys its rows (the guide:
never drop unless explicitly requested). The lint asks for the explicit allow (DM003); the
rehearsal tells the approver what the allow costs: just before each ``ALTER TABLE ... DROP
COLUMN`` reaches the copy, the column's non-null values are counted, whichever call sent it
(``drop_columns``, ``remove_fields``, ``migrator.sql``, a ``change_fields`` that recreates one).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from pglast import ast
from pglast.enums import AlterTableType, ObjectType
from pglast.parser import ParseError

from dbcore.lint.sql_rules import statements_of
from dbcore.migrate.observe import RunObserver, Statement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DroppedColumn:
    """A column the plan drops: where, how many non-null values it held on the copy, and who dropped it."""

    migration: str
    line: int | None  # of the migrator call in the migration file
    table: str
    column: str
    values: int

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        where = f"{self.migration}.py" + (f":{self.line}" if self.line else "")
        return f"{self.table}.{self.column}: {self.values} non-null value(s) on the copy ({where})"


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class DropCounter(RunObserver):
    """Told each statement of a rehearsal before it is sent; records the columns it drops and their values."""

    def __init__(self) -> None:
        self.dropped: list[DroppedColumn] = []

    def statement_started(self, statement: Statement) -> None:
        if "drop" not in statement.sql.lower():
            return
        try:
            nodes = [node for _, node in statements_of(statement.sql)]
        except ParseError:
            return  # PostgreSQL is about to say so itself
        for node in nodes:
            if not isinstance(node, ast.AlterTableStmt) or node.objtype != ObjectType.OBJECT_TABLE:
                continue
            relation = node.relation
            if relation is None or not relation.relname:
                continue
            names = [n for n in (relation.schemaname, relation.relname) if n]
            qualified = ".".join(_quoted(n) for n in names)
            for cmd in node.cmds or ():
                if cmd.subtype == AlterTableType.AT_DropColumn and cmd.name:
                    self._count(statement, qualified, relation.relname, cmd.name)

    def _count(self, statement: Statement, qualified: str, table: str, column: str) -> None:
        db = statement.db  # the observer's queries are neither recorded nor observed
        # DROP COLUMN IF EXISTS of a column that is not there: nothing to count, no error
        exists = db.execute_sql("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                                "AND attname = %s AND attnum > 0 AND NOT attisdropped",
                                (qualified, column)).fetchone()
        if not exists:
            return
        values = db.execute_sql(f"SELECT count({_quoted(column)}) FROM {qualified}").fetchone()[0]
        self.dropped.append(DroppedColumn(statement.migration, statement.line, table, column, int(values)))
        log.info("%s drops %s.%s holding %s non-null value(s) on the copy", statement.migration,
                 table, column, values)
