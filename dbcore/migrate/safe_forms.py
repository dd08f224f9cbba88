"""Safe forms: the migrator's risky operations rewritten into their zero-downtime forms.

peewee-migrate's operations produce exactly the forms the lint warns about (an index built
without CONCURRENTLY, a foreign key validated under ACCESS EXCLUSIVE, ``SET NOT NULL`` scanning
the table, a NOT NULL column with a default filled by a full-table UPDATE). :class:`SafeForms`
runs the queued operations of a flush, rewriting those on a table that existed before the batch
(a table created in the same batch is empty and needs none of it):

- ``add_index`` / ``index=True`` / ``unique=True`` -> ``CREATE [UNIQUE] INDEX CONCURRENTLY`` in
  phase 2 (the same name, columns and method: the same index); ``drop_index`` -> ``DROP INDEX
  CONCURRENTLY`` in phase 2;
- a foreign key or CHECK constraint -> ``NOT VALID`` in phase 1, ``VALIDATE`` in phase 4;
- ``add_not_null`` (and a ``change_fields`` to ``null=False``) -> ``CHECK (col IS NOT NULL) NOT
  VALID`` in phase 1; in phase 4 ``VALIDATE``, then ``SET NOT NULL`` (which then skips the scan)
  and the CHECK dropped;
- ``add_fields`` with a constant default -> one ``ADD COLUMN ... DEFAULT`` (PostgreSQL 11+ stores
  it without touching rows) and ``DROP DEFAULT``: the column ends as peewee's form leaves it;
- a volatile SQL default, or a type change that rewrites the table -> refused with the
  expand/contract recipe (:class:`~dbcore.errors.UnsafeChange`) unless the file allows it.

Work moved to a later phase is a :class:`Step`, written to ``migration_phase_step`` inside the
batch's transaction (dbcore.migrate.phases runs it after the commit). When a later operation of
the batch depends on a moved step (it renames or drops that table or column, drops the deferred
index, references its unique column, or is raw SQL naming the table), the step is done at once in
its plain form, and the plan says why. ``migrator.sql(...)`` is never rewritten: it runs as written.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field

import peewee
from playhouse.migrate import Operation, make_index_name

from dbcore.errors import UnsafeChange

log = logging.getLogger(__name__)

INDEX, DROP_INDEX, BACKFILL, VALIDATE, NOT_NULL = "index", "drop_index", "backfill", "validate", "not_null"
PHASE_OF = {INDEX: 2, DROP_INDEX: 2, BACKFILL: 3, VALIDATE: 4, NOT_NULL: 4}
PHASE_NAMES = {1: "the batch's transaction", 2: "concurrent index builds and drops",
               3: "backfills", 4: "validation"}

#: operations after which work deferred on their table is done at once, in its plain form
_DEPENDENTS = {"rename_table", "rename_column", "drop_column", "drop_table", "change_column",
               "drop_not_null", "drop_constraint", "drop_foreign_key_constraint",
               "alter_column_type", "add_unique"}

EXPAND_CONTRACT = ("add a new column of the new type, backfill it (migrator.backfill), switch the "
                   "application to it, then drop the old column in a later deploy")


@dataclass
class Step:
    """Work moved out of the batch's transaction: run after its commit, in phase ``phase``."""

    kind: str
    table: str
    name: str  # the index or constraint, or the column a backfill sets
    sql: list[str]  # what the later phase runs
    plain: list[str]  # the plain form: what runs inside the batch if a later operation needs it
    migration: str = ""
    detail: dict = field(default_factory=dict)
    id: int | None = None  # its row in migration_phase_step, once written
    done_plain: str = ""  # why it ran in its plain form inside the batch

    @property
    def phase(self) -> int:
        return PHASE_OF[self.kind]

    def describe(self) -> str:
        where = f"phase {self.phase} ({PHASE_NAMES[self.phase]})"
        if self.done_plain:
            where = f"plain form in the batch ({self.done_plain})"
        return f"{self.migration}: {self.kind} {self.name} on {self.table}, {where}"


def _query(db: peewee.Database, node) -> tuple[str, tuple]:
    ctx = node if isinstance(node, peewee.Context) else db.get_sql_context().sql(node)
    sql, params = ctx.query()
    return sql, tuple(params or ())


def inline(db: peewee.Database, sql: str, params: tuple) -> str:
    """Return ``sql`` with its parameters inlined as literals (psycopg2's own quoting)."""
    if not params:
        return sql
    cursor = db.cursor()
    try:
        return cursor.mogrify(sql, params).decode()
    finally:
        cursor.close()


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _truncate(name: str) -> str:
    return name if len(name) <= 63 else name[:63]


#: PostgreSQL changes of a column's type that keep the table as it is (no rewrite)
def rewrites(old: str, new: str) -> bool:
    """Return True when ``ALTER COLUMN ... TYPE new`` on a column of type ``old`` rewrites the table."""
    old, new = old.lower().strip(), new.lower().strip()
    aliases = {"varchar": "character varying", "int": "integer", "int4": "integer",
               "int8": "bigint", "bool": "boolean", "timestamptz": "timestamp with time zone",
               "timestamp": "timestamp without time zone", "decimal": "numeric"}

    def norm(t: str) -> tuple[str, list[int]]:
        m = re.match(r"^([a-z ]+?)\s*(?:\(([\d, ]+)\))?$", t)
        if not m:
            return t, []
        base = aliases.get(m.group(1).strip(), m.group(1).strip())
        return base, [int(x) for x in (m.group(2) or "").split(",") if x.strip()]

    (ob, oa), (nb, na) = norm(old), norm(new)
    if (ob, oa) == (nb, na):
        return False
    if ob == "character varying" and nb == "character varying":
        return bool(na) and (not oa or na[0] < oa[0])
    if ob in ("character varying", "text") and nb in ("text", "character varying") and not na:
        return False
    if ob == "numeric" and nb == "numeric":
        return bool(na) and (not oa or len(na) < 2 and len(oa) > 1 or na[0] < oa[0]
                             or (len(na) > 1 and len(oa) > 1 and na[1] != oa[1]))
    return True


_VOLATILE_SQL = """
SELECT coalesce(bool_or(provolatile = 'v'), false) FROM pg_proc WHERE proname = ANY(%s)
"""


class SafeForms:
    """Runs a flush's operations, rewriting the risky ones on tables that existed before the batch.

    One instance per apply (the migrator holds it): it remembers which tables existed when the
    batch began and the steps moved to later phases. ``enabled`` is the run's switch; a file's
    ``safe_forms = False`` turns it off for that file (``begin_file``); ``allow_rewrite`` (a file's
    ``allow_table_rewrite = True``) lets a rewriting type change or volatile default through.
    """

    def __init__(self, db: peewee.Database, *, enabled: bool = True, store=None) -> None:
        self.db = db
        self.enabled = enabled
        self.for_file = enabled
        self.allow_rewrite = False
        self.migration = ""
        self.steps: list[Step] = []
        self._existing: set[int] | None = None
        self._filled: set[tuple[str, str]] = set()
        #: called with each new step inside the batch's transaction (dbcore.migrate.phases.record)
        self.store = store
        #: called with a step done in its plain form inside the batch (phases.mark_plain)
        self.on_plain = None

    # -- the batch --------------------------------------------------------------------------

    def _ask(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Read the catalog on the connection's own cursor: not part of the migration's SQL."""
        cursor = self.db.cursor()
        try:
            cursor.execute(sql, params or None)
            return cursor.fetchall()
        finally:
            cursor.close()

    def begin_batch(self) -> None:
        """Note the tables that exist now: only those get safe forms."""
        rows = self._ask(
            "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p') AND n.nspname NOT IN ('pg_catalog', 'information_schema')")
        self._existing = {r[0] for r in rows}

    def begin_file(self, name: str, scope: dict) -> None:
        """The next operations come from migration ``name`` (its module's ``scope``)."""
        self.migration = name
        self.for_file = self.enabled and scope.get("safe_forms", True) is not False
        self.allow_rewrite = bool(scope.get("allow_table_rewrite", False))
        self._filled.clear()

    def pending(self) -> list[Step]:
        return [s for s in self.steps if not s.done_plain]

    def existing(self, table: str) -> bool:
        if self._existing is None:
            self.begin_batch()
        oid = self._ask("SELECT to_regclass(quote_ident(%s))::oid", (table,))[0][0]
        return oid is not None and self._existing is not None and oid in self._existing

    def _safe(self, table: str) -> bool:
        return self.for_file and self.existing(table)

    # -- running operations -------------------------------------------------------------------

    def run(self, op) -> None:
        """Run one queued operation (an Operation of the schema migrator, or a Python callable)."""
        if isinstance(op, Operation):
            self._handle(op, ())
        else:
            op()

    def _handle(self, result, chain: tuple) -> None:
        if isinstance(result, Operation):
            name = result.fn.__name__
            intercept = getattr(self, f"_op_{name}", None)
            if intercept is not None and intercept(result, chain):
                return
            self._handle(result.fn(result.migrator, *result.args, **result.kwargs), chain + (result,))
        elif isinstance(result, (peewee.Node, peewee.Context)):
            self._execute(result, chain)
        elif isinstance(result, (list, tuple)):
            for item in result:
                self._handle(item, chain)

    def _execute(self, node, chain: tuple) -> None:
        sql, params = _query(self.db, node)
        op = chain[-1] if chain else None
        name = op.fn.__name__ if op is not None else ""
        table = op.args[0] if op is not None and op.args and isinstance(op.args[0], str) else ""
        if name == "sql":
            self._raw_sql_depends(sql)
        elif name in _DEPENDENTS and table:
            self.materialize(table, f"a later {name} on {table} needs it")
        if name == "change_column" and sql.lstrip().upper().startswith("ALTER TABLE") and " TYPE " in sql:
            self._check_type_change(op, sql)
        self.db.execute_sql(sql, params or None)

    def _raw_sql_depends(self, sql: str) -> None:
        sql = re.sub(r"'(?:[^']|'')*'", "''", sql)  # a name inside a string literal is not the table
        if sql.lstrip().upper().startswith(("SELECT", "WITH")):
            return
        for table in {s.table for s in self.pending()}:
            if re.search(rf'(?<![\w"]){re.escape(table)}(?![\w"])|"{re.escape(table)}"', sql):
                self.materialize(table, f"migrator.sql of {self.migration} names {table}")

    def materialize(self, table: str, why: str, kinds: tuple[str, ...] | None = None,
                    name: str | None = None) -> None:
        """Do the deferred steps on ``table`` now, in their plain form, inside the batch."""
        for step in self.pending():
            if step.table != table or (kinds and step.kind not in kinds) or (name and step.name != name):
                continue
            step.done_plain = why
            log.info("%s: done in the batch in its plain form: %s", step.name, why)
            for statement in step.plain:
                self.db.execute_sql(statement)
            if self.on_plain is not None:
                self.on_plain(step)

    def defer(self, step: Step) -> None:
        step.migration = self.migration
        self.steps.append(step)
        if self.store is not None:
            self.store(step)

    # -- the rewrites -------------------------------------------------------------------------

    def _op_add_index(self, op: Operation, chain: tuple) -> bool:
        table = op.args[0]
        if not self._safe(table):
            return False
        sql, params = _query(self.db, op.fn(op.migrator, *op.args, **op.kwargs))
        plain = inline(self.db, sql, params)
        concurrent = re.sub(r"^CREATE (UNIQUE )?INDEX ", r"CREATE \1INDEX CONCURRENTLY ", plain, count=1)
        columns = op.args[1] if len(op.args) > 1 else op.kwargs.get("columns")
        name = op.kwargs.get("name") or make_index_name(table, list(columns))
        self.defer(Step(INDEX, table, name, [concurrent], [plain]))
        return True

    def _op_drop_index(self, op: Operation, chain: tuple) -> bool:
        table, name = op.args[0], op.args[1]
        deferred = [s for s in self.pending() if s.kind == INDEX and s.name == name]
        if deferred:
            self.materialize(deferred[0].table, f"a later drop_index of {name} in {self.migration}",
                             (INDEX,), name)
            return False
        if not self._safe(table):
            return False
        self.materialize(table, f"a later drop_index on {table}", (INDEX, DROP_INDEX))
        plain = f"DROP INDEX {_quote(name)}"
        self.defer(Step(DROP_INDEX, table, name, [f"DROP INDEX CONCURRENTLY IF EXISTS {_quote(name)}"],
                        [plain]))
        return True

    def _op_add_foreign_key_constraint(self, op: Operation, chain: tuple) -> bool:
        table, column, rel, rel_column = op.args[:4]
        self._unique_needed(rel, rel_column)
        if not self._safe(table):
            return False
        sql, params = _query(self.db, op.fn(op.migrator, *op.args, **op.kwargs))
        constraint = op.kwargs.get("constraint_name") or _truncate(f"fk_{table}_{column}_refs_{rel}")
        self._not_valid(table, constraint, inline(self.db, sql, params))
        return True

    def _op_add_constraint(self, op: Operation, chain: tuple) -> bool:
        table, name = op.args[0], op.args[1]
        sql, params = _query(self.db, op.fn(op.migrator, *op.args, **op.kwargs))
        body = sql.split(_quote(name), 1)[-1].lstrip().upper()
        if not self._safe(table) or not body.startswith(("CHECK", "FOREIGN KEY")) or "NOT VALID" in body:
            return False
        self._not_valid(table, name, inline(self.db, sql, params))
        return True

    def _not_valid(self, table: str, constraint: str, statement: str) -> None:
        self.db.execute_sql(statement + " NOT VALID")
        validate = f"ALTER TABLE {_quote(table)} VALIDATE CONSTRAINT {_quote(constraint)}"
        self.defer(Step(VALIDATE, table, constraint, [validate], [validate]))

    def _op_add_not_null(self, op: Operation, chain: tuple) -> bool:
        table, column = op.args[0], op.args[1]
        if not self._safe(table):
            return False
        already = (self._ask(
            "SELECT attnotnull FROM pg_attribute WHERE attrelid = to_regclass(quote_ident(%s)) "
            "AND attname = %s", (table, column)) or [(None,)])[0]
        if already and already[0]:
            return False  # SET NOT NULL on a NOT NULL column: nothing to scan
        check = _truncate(f"{table}_{column}_not_null")
        t, c, k = _quote(table), _quote(column), _quote(check)
        self.db.execute_sql(f"ALTER TABLE {t} ADD CONSTRAINT {k} CHECK ({c} IS NOT NULL) NOT VALID")
        sql = [f"ALTER TABLE {t} VALIDATE CONSTRAINT {k}",
               f"ALTER TABLE {t} ALTER COLUMN {c} SET NOT NULL",
               f"ALTER TABLE {t} DROP CONSTRAINT IF EXISTS {k}"]
        self.defer(Step(NOT_NULL, table, column, sql, sql, detail={"check": check}))
        return True

    def _op_apply_default(self, op: Operation, chain: tuple) -> bool:
        table, column = op.args[0], op.args[1]
        if (table, column) in self._filled:
            self._filled.discard((table, column))
            return True  # the column was added with this default: every row already has it
        return False

    def _op_add_column(self, op: Operation, chain: tuple) -> bool:
        table, column, fld = op.args[0], op.args[1], op.args[2]
        allow_not_null = op.kwargs.get("allow_not_null", op.args[3] if len(op.args) > 3 else False)
        if not self._safe(table):
            return False
        m = op.migrator
        fld = fld.clone()
        self._refuse_volatile(table, column, fld)
        has_default = fld.default is not None
        if not fld.null and not has_default and not allow_not_null:
            raise ValueError(f"{column} is not null but has no default")
        is_fk = isinstance(fld, peewee.ForeignKeyField)
        name, column_name, null = fld.name, fld.column_name, fld.null
        fld.name = fld.column_name = column
        ctx = m._alter_table(m.make_context(), table).literal(" ADD COLUMN ").sql(fld.ddl(m.make_context()))
        fld.name, fld.column_name = name, column_name
        if has_default:
            default = fld.default() if callable(fld.default) else fld.default
            ctx = ctx.literal(" DEFAULT ").sql(peewee.Value(fld.db_value(default)))
        fld.null = null
        sql, params = _query(self.db, ctx)
        self.db.execute_sql(sql, params or None)
        if has_default:
            # peewee's form fills the rows and leaves no default in the database: neither does this
            self.db.execute_sql(f"ALTER TABLE {_quote(table)} ALTER COLUMN {_quote(column)} DROP DEFAULT")
            if fld.null:
                self._filled.add((table, column))
        if is_fk:
            rel = fld.rel_model._meta
            statement = (f"ALTER TABLE {_quote(table)} ADD CONSTRAINT {_quote(_truncate(f'{table}_{column}_fkey'))} "
                         f"FOREIGN KEY ({_quote(column)}) REFERENCES {_quote(rel.table_name)} "
                         f"({_quote(fld.rel_field.column_name)})")
            statement += f" ON DELETE {fld.on_delete}" if fld.on_delete else ""
            statement += f" ON UPDATE {fld.on_update}" if fld.on_update else ""
            self._unique_needed(rel.table_name, fld.rel_field.column_name)
            self._not_valid(table, _truncate(f"{table}_{column}_fkey"), statement)
        if fld.index or fld.unique:
            self._handle(m.add_index(table, (column,), fld.unique, getattr(fld, "index_type", None)), ())
        return True

    # -- what is refused, what is needed at once -------------------------------------------------

    def _unique_needed(self, table: str, column: str) -> None:
        """A foreign key needs the referenced column's unique index now: build a deferred one plainly."""
        name = make_index_name(table, [column])
        self.materialize(table, f"a foreign key of {self.migration} references {table}.{column}",
                         (INDEX,), name)

    def _refuse_volatile(self, table: str, column: str, fld: peewee.Field) -> None:
        if self.allow_rewrite:
            return
        defaults = [" ".join(_query(self.db, c)[0].split()) for c in (fld.constraints or [])]
        calls = [f for d in defaults if d.upper().startswith("DEFAULT")
                 for f in re.findall(r"([A-Za-z_][\w]*)\s*\(", d)]
        if calls and self._ask(_VOLATILE_SQL, ([c.lower() for c in calls],))[0][0]:
            raise UnsafeChange(
                f"it adds {table}.{column} with a volatile default "
                f"({', '.join(defaults)}): PostgreSQL rewrites the whole table under ACCESS EXCLUSIVE; "
                f"{EXPAND_CONTRACT}, or set allow_table_rewrite = True in the file")

    def _check_type_change(self, op: Operation, sql: str) -> None:
        if self.allow_rewrite or not self._safe(op.args[0]):
            return
        table, column = op.args[0], op.args[1]
        row = (self._ask(
            "SELECT format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = "
            "to_regclass(quote_ident(%s)) AND attname = %s AND NOT attisdropped",
            (table, column)) or [(None,)])[0]
        if row[0] is None:  # no such column: the plain form's own error says so
            return
        new = re.search(r'\bTYPE\s+(.+?)(?:\s+NOT NULL|\s+NULL|\s+DEFAULT|\s+COLLATE|$)', sql)
        new_type = new.group(1) if new else ""
        if rewrites(row[0], new_type):
            raise UnsafeChange(
                f"it changes {table}.{column} from {row[0]} to {new_type}, "
                f"which rewrites the table under ACCESS EXCLUSIVE: no safe form exists in place; "
                f"{EXPAND_CONTRACT}, or set allow_table_rewrite = True in the file")
