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
from typing import Callable

from pglast.enums import AlterTableType, ObjectType
from pglast.parser import ParseError

from dbcore.lint.sql_rules import statements_of

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


class DropCounter:
    """Called before each statement of a rehearsal; records the columns it drops and their values."""

    def __init__(self) -> None:
        self.migration = ""
        self.dropped: list[DroppedColumn] = []

    def __call__(self, send: Callable, sql: str, line: int | None) -> None:
        if "drop" not in sql.lower():
            return
        try:
            statements = [node for _, node in statements_of(sql)]
        except ParseError:
            return  # PostgreSQL is about to say so itself
        for node in statements:
            if type(node).__name__ != "AlterTableStmt" or node.objtype != ObjectType.OBJECT_TABLE:
                continue
            relation = node.relation
            table = f"{relation.schemaname}.{relation.relname}" if relation.schemaname else relation.relname
            qualified = ".".join(_quoted(p) for p in table.split(".", 1))
            for cmd in node.cmds:
                if cmd.subtype != AlterTableType.AT_DropColumn:
                    continue
                # DROP COLUMN IF EXISTS of a column that is not there: nothing to count, no error
                exists = send("SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) "
                              "AND attname = %s AND attnum > 0 AND NOT attisdropped",
                              (qualified, cmd.name)).fetchone()
                if not exists:
                    continue
                values = send(f"SELECT count({_quoted(cmd.name)}) FROM {qualified}").fetchone()[0]
                self.dropped.append(DroppedColumn(self.migration, line, relation.relname, cmd.name,
                                                  int(values)))
                log.info("%s drops %s.%s holding %s non-null value(s) on the copy",
                         self.migration, relation.relname, cmd.name, values)
