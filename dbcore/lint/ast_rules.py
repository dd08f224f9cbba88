"""The guide's rules over one parsed migration file (the ``DM`` rules and the migrator's ``DS`` ones).

``migrate()`` and ``rollback()`` are each read in one pass, in source order: the migrator's
operations and the SQL strings share one ``SqlBatch``, so that what a statement may do depends on
what ran before it (a table dropped and then re-created is still a drop). Names bound to the
migrator (``mg = migrator``, a helper function's parameter) count as the migrator, and helper
functions are read where they are called.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterable

from dbcore.lint.report import Finding, finding
from dbcore.lint.sql_rules import RECIPES, SqlBatch
from dbcore.lint.syntax import (
    CREATES,
    aliases,
    calls_in_order,
    is_call_of,
    is_migrator_create,
    is_trivial,
    keyword,
    listed,
)
from dbcore.lint.values import Scope, table_of_class

#: calls on an imported database object that DM011 flags
_APP_DATABASE_CALLS = {"create_tables", "drop_tables", "execute_sql", "execute", "connect", "cursor"}
#: calls on an imported model class (a query through the app's own database) that DM011 flags
_APP_MODEL_CALLS = {"select", "update", "insert", "insert_many", "insert_from", "delete", "create",
                    "get", "get_or_none", "get_or_create", "get_by_id", "bulk_create",
                    "bulk_update", "raw", "replace", "create_table", "drop_table", "truncate_table"}
#: modules whose names are never "the application's"
_NOT_THE_APP = {"peewee", "playhouse", "peewee_migrate", "pw", "dbcore", "."}

# migrator methods whose first argument is a model class (or a table name)
MODEL_METHODS = {
    "create_model", "create_table", "remove_model", "drop_table", "add_fields", "add_columns",
    "change_fields", "change_columns", "remove_fields", "drop_columns", "rename_field",
    "rename_column", "rename_table", "add_index", "drop_index", "add_not_null", "drop_not_null",
    "add_default", "drop_default", "add_constraint", "drop_constraints", "backfill",
}
MIGRATOR_METHODS = MODEL_METHODS | {"sql", "run", "python"}
DROPS = {"remove_model", "drop_table"}
COLUMN_DROPS = {"drop_columns", "remove_fields"}
ADDS = {"add_fields", "add_columns", "add_column"}
# database methods that end or open a transaction of their own
_TRANSACTION_CALLS = {"commit", "rollback", "begin", "transaction", "atomic", "manual_commit",
                      "session_start", "session_commit", "session_rollback"}
# on the migration's own `database`, nested in the batch's transaction (peewee 4.5): atomic() is a
# savepoint, transaction() does nothing of its own; both end with the batch (docs/lint-rules.md)
_NESTING_CALLS = {"atomic", "transaction"}
# a `%` psycopg2 does not read as a placeholder or as an escaped percent sign
_STRAY_PERCENT = re.compile(r"%(?!%|s|\([^)]*\)s)")
_MAX_HELPER_DEPTH = 8

DM001_MESSAGE = ("runs SQL at once, before the migrator's queued operations (and even in a faked "
                 "run): use migrator.sql(...) instead")
DM004_FIX = ("add it null=True with a default, fill existing rows with migrator.sql('UPDATE ...'), "
             "then SET NOT NULL and DROP DEFAULT (migrations/004_fix_sourcedir_language.py)")


class ModuleLint:
    """The rules of one parsed migration file."""

    def __init__(self, tree: ast.Module, filename: str, allow_destructive: bool):
        self.tree = tree
        self.file = filename
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.allowed = allow_destructive or self._module_flag("allow_destructive") is True
        # dbcore.migrate.runner runs a migration declaring atomic = False alone, outside any transaction
        self.in_transaction = self._module_flag("atomic") is not False
        self.imports: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self.imports |= {(a.asname or a.name).split(".")[0]: a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                self.imports |= {a.asname or a.name: node.module or "." for a in node.names}
        self.module_scope = Scope(tree, imports=self.imports)
        entry = [f for name, f in self.functions.items() if name in ("migrate", "rollback")]
        self.database_params = {f.args.args[1].arg for f in entry if len(f.args.args) > 1}
        self.database_names = aliases(tree, {"database", "db"} | self.database_params)
        self.findings: list[Finding] = []
        self.visited: set[int] = set()  # the calls already judged
        self.read: set[int] = set()  # the functions already read as migrator code

    def _module_flag(self, name: str) -> object:
        """Return the constant a top-level ``name = ...`` sets (None when it is not set)."""
        for node in self.tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            value = getattr(node, "value", None)
            if any(isinstance(t, ast.Name) and t.id == name for t in targets) and isinstance(value, ast.Constant):
                return value.value
        return None

    def add(self, rule: str, line: int, message: str, severity=None) -> None:
        self.findings.append(finding(rule, self.file, line, message, severity))

    def batch(self, droppable: Iterable[str] = frozenset(),
              droppable_columns: Iterable[tuple[str, str]] = frozenset()) -> SqlBatch:
        return SqlBatch(droppable_tables=droppable, allow_destructive=self.allowed,
                        in_transaction=self.in_transaction, source=self.file,
                        droppable_columns=droppable_columns)

    def run(self) -> list[Finding]:
        self._whole_file_rules()
        migrate, rollback = self.functions.get("migrate"), self.functions.get("rollback")
        made: set[str] = set()
        added: set[tuple[str, str]] = set()
        if migrate is not None:
            made, added = self._read_entry(migrate, self.batch())
        if rollback is None:
            if migrate is not None and not is_trivial(migrate.body):
                self.add("DM005", migrate.lineno,
                         "no rollback(): write one that undoes migrate() (the rollback subflow "
                         "runs it after a failed post-check)")
        else:
            if migrate is not None and not is_trivial(migrate.body) and is_trivial(rollback.body):
                self.add("DM005", rollback.lineno,
                         "rollback() does nothing while migrate() changes the schema: make it "
                         "undo migrate(), or raise with the manual steps if it cannot")
            self._read_entry(rollback, self.batch(made, added))
        self._unread_helpers()
        self._unjudged_drops()
        return list(dict.fromkeys(self.findings))  # a helper read twice reports once

    def _read_entry(self, fn: ast.FunctionDef, batch: SqlBatch
                    ) -> tuple[set[str], set[tuple[str, str]]]:
        """Read migrate() or rollback() in one batch; return the tables and columns it leaves created."""
        migrator = fn.args.args[0].arg if fn.args.args else "migrator"
        self._read(fn, Scope(fn, self.module_scope), {migrator}, batch, fn.name, [])
        return set(batch.created), set(batch.added_columns)

    # -- file-wide rules ----------------------------------------------------------------------

    def _whole_file_rules(self) -> None:
        """DM001, DM002, DM010 and DM011 apply anywhere in the file, helpers included, except in
        ``verify(database)``: the team's data check runs after the apply, read-only, on its own
        connection (dbcore/checks/data.py), where ``database.execute_sql`` is the way to read."""
        verify = self.functions.get("verify")
        checked_apart = {id(n) for n in ast.walk(verify)} if verify is not None else set()
        for node in ast.walk(self.tree):
            if id(node) in checked_apart:
                continue
            if isinstance(node, ast.Attribute):
                on_database = isinstance(node.value, ast.Name) and node.value.id in self.database_names
                if node.attr == "execute_sql":
                    self.add("DM001", node.lineno, f"{ast.unparse(node)} {DM001_MESSAGE}")
                elif node.attr in ("cursor", "connection") and on_database:
                    self.add("DM001", node.lineno, f"{ast.unparse(node)}() gives a raw connection "
                             f"that {DM001_MESSAGE}")
            if not isinstance(node, ast.Call):
                continue
            if (isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) > 1
                    and isinstance(node.args[1], ast.Constant)
                    and node.args[1].value in ("execute_sql", "cursor", "connection")):
                self.add("DM001", node.lineno, f"getattr(..., {node.args[1].value!r}) {DM001_MESSAGE}")
            if not isinstance(node.func, ast.Attribute):
                continue
            attr = node.func.attr
            receiver = node.func.value
            self._app_call(node.func, receiver, attr)
            if attr in ("add_column", "drop_column"):
                self.add("DM002", node.lineno,
                         f"{attr} is not the migrator's API: use {attr}s(Model, ...) instead")
            elif attr in _TRANSACTION_CALLS and isinstance(receiver, ast.Name):
                self._transaction_call(node, receiver.id, attr)

    def _app_database(self, name: str) -> str | None:
        """Return the module an application's database object ``name`` is imported from (None: not one)."""
        origin = self.imports.get(name)
        if origin is None or name in self.database_params or origin.startswith(("peewee", "playhouse")):
            return None
        return origin

    def _transaction_call(self, node: ast.Call, name: str, attr: str) -> None:
        """DM010: transaction control on a database object; atomic()/transaction() on the migration's own is nesting."""
        origin = self._app_database(name)
        if origin is not None:
            self.add("DM010", node.lineno,
                     f"{name}.{attr}() is on the database object imported from {origin}: another "
                     "connection, whose transaction commits on its own even if the batch is rolled "
                     "back: use the migration's `database` argument (database.atomic() nests in the "
                     "batch)")
        elif attr in ("commit", "rollback") and name in self._nested_transactions():
            self.add("DM010", node.lineno,
                     f"{name}.{attr}() on a nested database.transaction() is the connection's own "
                     f"{attr.upper()}: it ends the batch transaction, so a later failure can no "
                     "longer undo what ran before: remove it")
        elif name in self.database_names and attr not in _NESTING_CALLS:
            self.add("DM010", node.lineno,
                     f"database.{attr}() in a migration ends or splits the batch transaction, "
                     "so a later failure can no longer undo what ran before: remove it (the "
                     "runner already wraps every migration in one transaction)")

    def _nested_transactions(self) -> set[str]:
        """Names bound by ``with database.transaction() as NAME`` on the migration's own database."""
        names = set()
        for node in ast.walk(self.tree):
            if isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    call = item.context_expr
                    if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                            and call.func.attr == "transaction" and isinstance(call.func.value, ast.Name)
                            and call.func.value.id in self.database_names
                            and isinstance(item.optional_vars, ast.Name)):
                        names.add(item.optional_vars.id)
        return names

    def _app_call(self, func: ast.Attribute, receiver: ast.expr, attr: str) -> None:
        """DM011: a call on the application's own database object or models, imported by the file."""
        source = self._app_import(receiver)
        if source and attr in _APP_DATABASE_CALLS:
            self.add("DM011", func.lineno,
                     f"{ast.unparse(func)}() uses the database object imported from "
                     f"{source}: it runs on the application's own connection, "
                     "outside the batch transaction (it stays even if the batch is rolled back): "
                     "use the migration's `database` argument or the migrator")
        elif source and attr in _APP_MODEL_CALLS:
            self.add("DM011", func.lineno,
                     f"{ast.unparse(func)}() uses the application's model imported from "
                     f"{source}: it queries through the application's own database (the one "
                     "its DATABASE_URL names), outside the batch transaction; before the "
                     "approval it reaches only the rehearsal's copy: define the model in the "
                     "migration (or use migrator.orm[...]) and change data with migrator.sql")

    def _app_import(self, receiver: ast.expr) -> str:
        """Return the module ``receiver`` (a name, or a.b.c) was imported from, if it is the app's; else ""."""
        root = receiver
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name) or root.id not in self.imports or root.id in self.database_params:
            return ""
        module = self.imports[root.id]
        if module.split(".")[0] in _NOT_THE_APP or module.split(".")[0] in sys.stdlib_module_names:
            return ""
        return module

    def _unread_helpers(self) -> None:
        """Read helper functions never called with the migrator in a way the lint can follow."""
        for fn in ast.walk(self.tree):
            if not isinstance(fn, ast.FunctionDef) or id(fn) in self.read or \
                    fn.name in ("migrate", "rollback") and fn in self.functions.values():
                continue
            params = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
            receivers = {c.func.value.id for c in calls_in_order(fn)
                         if isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name)
                         and c.func.attr in MIGRATOR_METHODS} & params
            if receivers:
                self._read(fn, Scope(fn, self.module_scope), receivers, self.batch(), fn.name, [])

    def _unjudged_drops(self) -> None:
        """DM003 applies file-wide: any drop call the migrator reading did not judge.

        ``database.drop_tables([A, B])`` in rollback() undoing a ``create_tables([A, B])`` of
        migrate() drops only what the file itself created.
        """
        migrate, rollback = self.functions.get("migrate"), self.functions.get("rollback")
        created = {ast.unparse(e) for n in ast.walk(migrate) if is_call_of(n, "create_tables")
                   for e in listed(n)} if migrate else set()
        undone = {id(n) for n in ast.walk(rollback) if is_call_of(n, "drop_tables")
                  and listed(n) and {ast.unparse(e) for e in listed(n)} <= created} if rollback else set()
        for node in ast.walk(self.tree):
            if id(node) in undone:
                continue
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in DROPS | {"drop_tables"} and id(node) not in self.visited):
                for rule, message, severity in self.batch().drop(
                        "?", f"{ast.unparse(node.func)}() drops its table(s) at once and"):
                    self.add(rule, node.lineno, message, severity)

    # -- migrate(), rollback() and their helpers ------------------------------------------------

    def _read(self, fn: ast.FunctionDef | ast.AsyncFunctionDef, scope: Scope, migrator: set[str], batch: SqlBatch,
              where: str, stack: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> None:
        self.read.add(id(fn))
        migrator = aliases(fn, migrator)
        # `pw_migrate create --auto` writes `@migrator.create_model class File(pw.Model): ...`:
        # the table is created by the file itself, and remove_model("file") may name it by
        # table or by class (1.x files lower-case it)
        for node in ast.walk(fn):
            if isinstance(node, ast.ClassDef) and any(
                    is_migrator_create(d, migrator) for d in node.decorator_list):
                for name in {table_of_class(node), node.name, node.name.lower()}:
                    batch.create(name)
        for call in calls_in_order(fn):
            func = call.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.value.id in migrator:
                self.visited.add(id(call))
                self._migrator_call(where, call, scope, batch)
            elif isinstance(func, ast.Name):
                self._helper_call(fn, call, scope, migrator, batch, where, stack)

    def _helper_call(self, fn, call: ast.Call, scope: Scope, migrator: set[str], batch: SqlBatch,
                     where: str, stack: list[ast.FunctionDef | ast.AsyncFunctionDef]) -> None:
        """Read a helper function where it is called, its migrator parameters as the migrator."""
        assert isinstance(call.func, ast.Name)  # _read calls it for a call of a plain name
        helper = scope.function_named(call.func.id)
        if helper is None or helper in stack or len(stack) >= _MAX_HELPER_DEPTH:
            return
        params = [a.arg for a in helper.args.posonlyargs + helper.args.args]
        passed = {params[i] for i, arg in enumerate(call.args[:len(params)])
                  if isinstance(arg, ast.Name) and arg.id in migrator}
        passed |= {k.arg for k in call.keywords
                   if k.arg is not None and isinstance(k.value, ast.Name) and k.value.id in migrator}
        nested = helper.name in scope.functions and scope is not self.module_scope
        closure = (migrator - set(params)) if nested else set()
        if passed | closure:
            inner = Scope(helper, scope if nested else self.module_scope)
            self._read(helper, inner, passed | closure, batch, where, stack + [helper])

    def _migrator_call(self, where: str, call: ast.Call, scope: Scope, batch: SqlBatch) -> None:
        assert isinstance(call.func, ast.Attribute)  # migrator.METHOD(...)
        method = call.func.attr
        first = call.args[0] if call.args else keyword(call, "model")
        table = None
        if method in MODEL_METHODS and first is not None:
            self._check_model_arg(where, method, first, scope)
            # a model the lint cannot resolve is keyed by its text, the same in both functions
            table = scope.table(first, call) or ast.unparse(first)
        if method in CREATES and table:
            batch.create(table)
        elif method in DROPS:
            what = f"{where}() dropping table {table}" + \
                ("" if where == "migrate" else " that its migrate() did not create")
            for rule, message, severity in batch.drop(table or "(unknown)", what):
                self.add(rule, call.lineno, message, severity)
        elif method == "sql":
            self._check_sql_call(call, scope, batch)
        elif method == "backfill":
            self.add("DM013", call.lineno,
                     f"migrator.backfill on {table or 'a table'} is dbmigrate's own operation: "
                     "it runs after the batch's commit, in short batches (phase 3); pw_migrate "
                     "cannot run this file, keep the project on dbmigrate apply")
        elif method in COLUMN_DROPS:
            self._check_column_drops(where, method, call, first, table or "(unknown)", scope, batch)
        elif table is not None and not batch.is_existing(table):
            if method == "rename_table" and len(call.args) > 1:
                batch.rename(table, scope.table(call.args[1], call) or "")
        elif method in ADDS:
            self._check_added_fields(call, table or "(unknown)", scope)
            for name, _, _ in self._added_fields(call, scope):
                batch.add_column(table or "(unknown)", "*" if name.startswith("**") else name)
        else:
            self._check_locking_method(method, call, table or "the table")

    def _check_column_drops(self, where: str, method: str, call: ast.Call, model: ast.expr | None,
                            table: str, scope: Scope, batch: SqlBatch) -> None:
        """DM003 for each column dropped; DM012 where peewee-migrate versions read the call differently."""
        names: list[str] = []
        for arg in call.args[1:]:
            value = scope.value(arg, call)
            if isinstance(value, (ast.List, ast.Tuple)):
                listed_names = [e.value for e in value.elts if isinstance(e, ast.Constant)
                                and isinstance(e.value, str)]
                shown = ", ".join(repr(n) for n in listed_names) or "..."
                self.add("DM012", call.lineno,
                         f"migrator.{method}({ast.unparse(model) if model else '...'}, [{shown}]) "
                         "passes a list where column names are expected: peewee-migrate reads it "
                         "as one name no field has and drops nothing, dbmigrate drops each column "
                         f"listed: pass the names themselves, migrator.{method}(Model, {shown})")
                names += listed_names
            elif isinstance(value, ast.Constant) and isinstance(value.value, str):
                names.append(value.value)
        cls = scope.class_named(model.id) if isinstance(model, ast.Name) else None
        if cls is not None:
            # a column this file's migrate() added is undone as meant (peewee-migrate's rollback
            # would leave it: its class never had the field)
            known = _fields_of_class(cls) | {c for t, c in batch.droppable_columns | batch.added_columns
                                             if t == table}
            for name in (n for n in names if n not in known):
                self.add("DM012", call.lineno,
                         f"migrator.{method}({cls.name}, {name!r}): class {cls.name} in this file "
                         f"has no field {name!r}: peewee-migrate skips it and drops nothing, dbmigrate "
                         f"drops column {name}: add the field to the class, or drop it with "
                         f"migrator.sql('ALTER TABLE {table} DROP COLUMN {name}')")
        for name in names:
            what = f"{where}() dropping column {table}.{name}" + \
                ("" if where == "migrate" else " that its migrate() did not add")
            for rule, message, severity in batch.drop_column(table, name, what):
                self.add(rule, call.lineno, message, severity)

    def _check_model_arg(self, where: str, method: str, node: ast.expr, scope: Scope) -> None:
        root = node
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name):
            return  # a table name string, or migrator.orm["table"]: this migration's schema
        origin = self.imports.get(root.id)
        if origin is None and (root is not node or scope.class_named(root.id) or scope.binds(root.id)):
            return  # defined or bound in the migration (e.g. Project = migrator.orm["project"])
        name = ast.unparse(node)
        how = f"imported from {origin}" if origin else "not defined in this migration"
        self.add("DM008", node.lineno,
                 f"{where}() passes {name} to migrator.{method} but the class is {how}: the "
                 "application's current model may not match the schema at this migration; "
                 "define the model class in the migration file")

    def _check_sql_call(self, call: ast.Call, scope: Scope, batch: SqlBatch) -> None:
        """Check a migrator.sql call: how its SQL is built, its placeholders, then the SQL itself."""
        node = call.args[0] if call.args else keyword(call, "sql")
        if node is None:
            return
        value = scope.string(node, call)
        if value.built:
            self.add("DM006", call.lineno,
                     f"migrator.sql builds its SQL with {value.built}: keep the SQL a constant "
                     "string and pass values as parameters, migrator.sql('... WHERE x = %s', value) "
                     "(identifiers cannot be parameters: write them into the string)")
            return
        if value.text is None:
            self.add("DM006", call.lineno,
                     f"cannot check this SQL statically ({ast.unparse(node)[:60]} is not a constant "
                     "string): write the SQL as a string literal in the migration, so that the "
                     "lint (and the reviewer) can read it", "warning")
            return
        text, params = value.text, call.args[1:]
        if _STRAY_PERCENT.search(text.replace("%%", "")):
            self.add("DM009", call.lineno,
                     "migrator.sql has a literal % that psycopg2 reads as a placeholder and fails "
                     "on: write it as %%")
        elif "%(" not in text and not any(isinstance(p, ast.Starred) for p in params):
            wanted = text.replace("%%", "").count("%s")
            if wanted != len(params):
                self.add("DM009", call.lineno,
                         f"migrator.sql has {wanted} %s placeholder(s) but {len(params)} "
                         "parameter(s): pass one value per %s, as migrator.sql(sql, a, b)")
        self.findings += batch.check(text, call.lineno)

    def _added_fields(self, call: ast.Call, scope: Scope):
        """Yield (name, field expression or None when unknown, line) of an add_columns call."""
        for kw in call.keywords:
            if kw.arg == "allow_not_null":
                continue
            if kw.arg is not None:
                yield kw.arg, scope.value(kw.value, call), kw.value.lineno
                continue
            fields = scope.value(kw.value, call)
            if isinstance(fields, ast.Dict) and all(isinstance(k, ast.Constant) for k in fields.keys):
                for key, value in zip(fields.keys, fields.values):
                    yield str(getattr(key, "value", "")), scope.value(value, call), value.lineno
            else:
                yield f"**{ast.unparse(kw.value)}", None, kw.value.lineno

    #: what the safe forms (dbcore/migrate/safe_forms.py) do instead, by rule
    SAFE_FORMS = {"DS101": "CREATE INDEX CONCURRENTLY after the batch's commit (phase 2)",
                  "DS102": "the constraint NOT VALID in the batch, VALIDATE after it (phase 4)",
                  "DS104": "CHECK (col IS NOT NULL) NOT VALID in the batch, then VALIDATE, SET NOT NULL "
                           "and the CHECK dropped after it (phase 4)"}

    def _migrator_form(self, rule: str, line: int, message: str) -> None:
        """A finding on SQL the migrator generates: a note when dbmigrate's safe forms replace it."""
        if self._module_flag("safe_forms") is False:
            self.add(rule, line, message)
            return
        plain = message.split(": ", 1)[0]
        self.add(rule, line, f"{plain}: dbmigrate apply runs its safe form instead, {self.SAFE_FORMS[rule]} "
                 "(pw_migrate would run the plain form; `safe_forms = False` in the file turns it off)",
                 "note")

    def _check_added_fields(self, call: ast.Call, table: str, scope: Scope) -> None:
        allow_not_null = any(k.arg == "allow_not_null" and isinstance(k.value, ast.Constant)
                             and k.value.value is True for k in call.keywords)
        for name, field, line in self._added_fields(call, scope):
            if not isinstance(field, ast.Call):
                self.add("DM004", line, f"cannot check the field(s) {table}.{name} statically: "
                         "pass each field as name=pw.XField(...) in the call, so that the lint can "
                         "tell whether it is added NOT NULL in one step", "warning")
                continue
            options = {k.arg: k.value for k in field.keywords if k.arg}

            def is_true(key: str, default: bool = False) -> bool:
                value = options.get(key)
                return default if value is None else isinstance(value, ast.Constant) and value.value is True

            default = options.get("default")
            has_default = default is not None and not (isinstance(default, ast.Constant)
                                                       and default.value is None)
            kind = ast.unparse(field.func)
            if not is_true("null") and (allow_not_null or not has_default):
                consequence = ("PostgreSQL rejects it on any table with rows" if allow_not_null else
                               "peewee raises ValueError ('... is not null but has no default') "
                               "as soon as the migration runs")
                self.add("DM004", line, f"{table}.{name} is added NOT NULL without a default in one "
                         f"step: {consequence}; {DM004_FIX}")
            foreign_key = kind.endswith("ForeignKeyField")
            if foreign_key:
                self._migrator_form("DS102", line,
                         f"{table}.{name} adds a foreign key validated at once, locking {table} "
                         f"while every row is checked: {RECIPES['DS102']}")
            if is_true("index", default=foreign_key) or is_true("unique"):
                what = "its foreign key's index" if foreign_key and not is_true("unique") else "an index"
                self._migrator_form("DS101", line,
                         f"{table}.{name} builds {what} on existing table {table} without "
                         f"CONCURRENTLY: {RECIPES['DS101']}")

    def _check_locking_method(self, method: str, call: ast.Call, table: str) -> None:
        """The SQL rules, for migrator methods that generate such SQL themselves."""
        if method in ("rename_field", "rename_column", "rename_table"):
            self.add("DS105", call.lineno, f"migrator.{method} on {table} breaks the running "
                     f"application's queries until it is redeployed: {RECIPES['DS105']}")
        elif method in ("change_fields", "change_columns"):
            self.add("DS103", call.lineno, f"migrator.{method} on {table} may change a column's "
                     f"type, rewriting the table under an ACCESS EXCLUSIVE lock: {RECIPES['DS103']}")
        elif method == "add_not_null":
            self._migrator_form("DS104", call.lineno, f"migrator.add_not_null on {table} scans the whole table "
                     f"under an ACCESS EXCLUSIVE lock: {RECIPES['DS104']}")
        elif method == "add_index":
            self._migrator_form("DS101", call.lineno, f"migrator.add_index on existing table {table} builds "
                     f"the index without CONCURRENTLY: {RECIPES['DS101']}")


def _fields_of_class(cls: ast.ClassDef) -> set[str]:
    """Return the field names (and their column_name=) a model class body assigns, ``id`` included."""
    names = {"id"}
    for node in cls.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            names |= {k.value.value for k in node.value.keywords if k.arg == "column_name"
                      and isinstance(k.value, ast.Constant) and isinstance(k.value.value, str)}
    return names
