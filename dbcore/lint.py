"""Safety lint over migration files: the guide's rules, read from the Python AST.

A migration file is never imported or run here: a file that does not parse is a finding of its
own (DM000), never a crash. The SQL it hands to ``migrator.sql`` is checked by ``lint_sql``.
Rule ids, severities and the safe recipes are documented in docs/lint-rules.md.
"""

from __future__ import annotations

import ast
import logging
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from dbcore.lint_report import RULES, Finding, LintReport, finding
from dbcore.lint_sql import RECIPES, created_tables, lint_sql

__all__ = ["RULES", "Finding", "LintReport", "lint_file", "lint_paths", "lint_source", "lint_sql",
           "check_names"]

log = logging.getLogger(__name__)

#: what a migration file must be called; peewee-migrate silently skips anything not NNN_...
MIGRATION_NAME = re.compile(r"^(\d{3})_(\w+)\.py$")
_LEADING_NUMBER = re.compile(r"^(\d+)[_-]?(.*?)(\.py)?$")

# migrator methods whose first argument is a model class (or a table name)
MODEL_METHODS = {
    "create_model", "create_table", "remove_model", "drop_table", "add_fields", "add_columns",
    "change_fields", "change_columns", "remove_fields", "drop_columns", "rename_field",
    "rename_column", "rename_table", "add_index", "drop_index", "add_not_null", "drop_not_null",
    "add_default", "drop_default", "add_constraint", "drop_constraints",
}
CREATES = {"create_model", "create_table"}
DROPS = {"remove_model", "drop_table"}
ADDS = {"add_fields", "add_columns", "add_column"}
# database methods that end or open a transaction of their own
_TRANSACTION_CALLS = {"commit", "rollback", "begin", "transaction", "atomic", "manual_commit",
                      "session_start", "session_commit", "session_rollback"}


def _called_on_database(func: ast.Attribute) -> bool:
    """True for ``database.x()`` / ``db.x()``: the migration's database argument, by its usual names."""
    return isinstance(func.value, ast.Name) and func.value.id in {"database", "db"}


# a `%` psycopg2 does not read as a placeholder or as an escaped percent sign
_STRAY_PERCENT = re.compile(r"%(?!%|s|\([^)]*\)s)")


def lint_paths(paths: Iterable[Path], *, allow_destructive: bool = False) -> LintReport:
    """Return the report over migration files and folders (a folder means its ``*.py`` files)."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(p for p in path.glob("*.py") if not p.name.startswith("__"))
        else:
            files.append(path)
    findings: list[Finding] = []
    for path in files:
        findings += lint_file(path, allow_destructive=allow_destructive)
    findings += check_names(files)
    return LintReport.of(findings, [str(p) for p in files])


def lint_pending(migrations_dir: Path, pending: Iterable[Path], *,
                 allow_destructive: bool = False) -> LintReport:
    """Return the lint of the migrations about to run (and the folder's names and numbering).

    Findings on migrations applied long ago are history, not something to stop a deploy for.
    """
    pending = [Path(p) for p in pending]
    report = lint_paths([Path(migrations_dir)], allow_destructive=allow_destructive)
    relevant = [f for f in report.findings if Path(f.file) in pending or f.rule == "DM007"]
    return LintReport.of(relevant, [str(p) for p in pending])


def lint_file(path: Path, *, allow_destructive: bool = False) -> list[Finding]:
    """Return the findings of one migration file (its name and its content)."""
    path = Path(path)
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return [finding("DM000", str(path), 1, f"cannot read the file ({exc}): fix or remove it")]
    return _name_findings(path) + lint_source(source, str(path), allow_destructive=allow_destructive)


def lint_source(source: str, filename: str, *, allow_destructive: bool = False) -> list[Finding]:
    """Return the findings of a migration's source text (name rules aside)."""
    try:
        tree = ast.parse(source, filename=filename)
    except SyntaxError as exc:
        return [finding("DM000", filename, exc.lineno or 1,
                        f"syntax error: {exc.msg}: fix it; peewee-migrate would fail on it only "
                        "after running the migrations before it")]
    return _ModuleLint(tree, filename, allow_destructive).run()


def check_names(files: Iterable[Path]) -> list[Finding]:
    """Return DM007 findings for duplicate numbers and gaps among the files' folders' migrations."""
    files = [Path(p) for p in files]
    wanted = {p.resolve() for p in files}
    findings: list[Finding] = []
    for folder in sorted({p.parent for p in files}):
        numbered: dict[int, list[Path]] = defaultdict(list)
        for sibling in folder.glob("*.py"):
            match = MIGRATION_NAME.match(sibling.name)
            if match:
                numbered[int(match.group(1))].append(sibling)
        expected = 1
        for number in sorted(numbered):
            group = sorted(numbered[number])
            for path in group:
                if path.resolve() not in wanted:
                    continue
                if len(group) > 1:
                    others = ", ".join(p.name for p in group if p != path)
                    findings.append(finding("DM007", str(path), 1,
                                            f"number {number:03d} is also used by {others}: "
                                            f"renumber the newer one {max(numbered) + 1:03d}"))
                if number != expected:
                    findings.append(finding("DM007", str(path), 1,
                                            f"number {number:03d} is out of sequence (expected "
                                            f"{expected:03d}): migrations run in name order; "
                                            f"rename it {expected:03d}_..."))
            expected = number + 1
    return findings


def _name_findings(path: Path) -> list[Finding]:
    if MIGRATION_NAME.match(path.name):
        return []
    match = _LEADING_NUMBER.match(path.name)
    if match and match.group(2):
        words = re.sub(r"\W+", "_", match.group(2)).strip("_").lower()
        better = f"{int(match.group(1)) % 1000:03d}_{words}.py"
    else:
        better = "NNN_what_it_does.py"
    return [finding("DM007", str(path), 1,
                    f"file name {path.name!r} is not NNN_name.py, so peewee-migrate does not run "
                    f"it as expected: rename it (e.g. {better})")]


# -- the AST rules -------------------------------------------------------------------------------


def _is_trivial(body: list[ast.stmt]) -> bool:
    """True for a body of only a docstring, ``pass`` and ``...``."""
    return all(isinstance(s, ast.Pass)
               or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def _table_of_class(node: ast.ClassDef) -> str:
    for item in node.body:
        if isinstance(item, ast.ClassDef) and item.name == "Meta":
            for stmt in item.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                        and any(isinstance(t, ast.Name) and t.id == "table_name" for t in stmt.targets)):
                    return str(stmt.value.value)
    # peewee's default table name (legacy_table_names)
    return re.sub(r"[^\w]+", "_", node.name.lower())


def _bindings(nodes: Iterable[ast.AST]) -> tuple[dict[str, ast.ClassDef], dict[str, list[ast.expr]], set[str]]:
    """Return the classes, the assigned values and every other name bound directly in ``nodes``."""
    classes: dict[str, ast.ClassDef] = {}
    values: dict[str, list[ast.expr]] = defaultdict(list)
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ClassDef):
            classes[node.name] = node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for name in ast.walk(target):
                    if isinstance(name, ast.Name):
                        values[name.id].append(node.value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.For, ast.withitem, ast.NamedExpr)):
            target = getattr(node, "target", None) or getattr(node, "optional_vars", None)
            names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)} if target else set()
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return classes, values, names


@dataclass
class _Scope:
    """What a name in one function may refer to: its own bindings first, then the module's."""

    classes: dict[str, ast.ClassDef]
    values: dict[str, list[ast.expr]]
    names: set[str]
    imports: dict[str, str] = field(default_factory=dict)

    def value(self, node: ast.expr) -> ast.expr:
        """Return what a name assigned exactly once stands for (else the node itself)."""
        if isinstance(node, ast.Name) and len(self.values.get(node.id, ())) == 1:
            return self.values[node.id][0]
        return node

    def table(self, node: ast.expr) -> str | None:
        """Return the table a model argument names (a table name, a known class, migrator.orm[name])."""
        node = self.value(node) if isinstance(node, ast.Name) and node.id not in self.classes else node
        if isinstance(node, ast.Subscript):  # migrator.orm["table"]
            node = node.slice
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and node.id in self.classes:
            return _table_of_class(self.classes[node.id])
        return None


class _ModuleLint:
    """The rules of one parsed migration file."""

    def __init__(self, tree: ast.Module, filename: str, allow_destructive: bool):
        self.tree = tree
        self.file = filename
        self.functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
        self.allowed = allow_destructive or self._module_flag("allow_destructive") is True
        # dbcore.runner runs a migration declaring atomic = False alone, outside any transaction
        self.in_transaction = self._module_flag("atomic") is not False
        self.imports: dict[str, str] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                self.imports |= {(a.asname or a.name).split(".")[0]: a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                self.imports |= {a.asname or a.name: node.module or "." for a in node.names}
        self.module_scope = _bindings(tree.body)
        self.findings: list[Finding] = []

    def _module_flag(self, name: str) -> object:
        """Return the constant a top-level ``name = ...`` sets (None when it is not set)."""
        for node in self.tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            if (any(isinstance(t, ast.Name) and t.id == name for t in targets)
                    and isinstance(node.value, ast.Constant)):
                return node.value.value
        return None

    def add(self, rule: str, line: int, message: str, severity=None) -> None:
        self.findings.append(finding(rule, self.file, line, message, severity))

    def run(self) -> list[Finding]:
        self._whole_file_rules()
        migrate, rollback = self.functions.get("migrate"), self.functions.get("rollback")
        made: set[str] = set()
        if migrate is not None:
            made = self._function_rules(migrate, droppable=set())
        if rollback is None:
            if migrate is not None and not _is_trivial(migrate.body):
                self.add("DM005", migrate.lineno,
                         "no rollback(): write one that undoes migrate() (the rollback subflow "
                         "runs it after a failed post-check)")
        else:
            if migrate is not None and not _is_trivial(migrate.body) and _is_trivial(rollback.body):
                self.add("DM005", rollback.lineno,
                         "rollback() does nothing while migrate() changes the schema: make it "
                         "undo migrate(), or raise with the manual steps if it cannot")
            self._function_rules(rollback, droppable=made)
        return self.findings

    def _whole_file_rules(self) -> None:
        """DM001 and DM002 apply anywhere in the file, helpers included."""
        for node in ast.walk(self.tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            attr = node.func.attr
            if attr == "execute_sql":
                self.add("DM001", node.lineno,
                         "database.execute_sql runs at once, before the migrator's queued "
                         "operations (and even in a faked run): use migrator.sql(...) instead")
            elif attr in ("add_column", "drop_column"):
                self.add("DM002", node.lineno,
                         f"{attr} is not the migrator's API: use {attr}s(Model, ...) instead")
            elif attr in _TRANSACTION_CALLS and _called_on_database(node.func):
                self.add("DM010", node.lineno,
                         f"database.{attr}() in a migration ends or splits the batch transaction, "
                         "so a later failure can no longer undo what ran before: remove it (the "
                         "runner already wraps every migration in one transaction)")

    def _scope(self, fn: ast.FunctionDef) -> _Scope:
        classes, values, names = self.module_scope
        local_classes, local_values, local_names = _bindings(
            [n for stmt in fn.body for n in ast.walk(stmt)] + list(ast.walk(fn.args)))
        return _Scope({**classes, **local_classes}, {**values, **local_values},
                      names | local_names | set(values) | set(local_values), self.imports)

    def _function_rules(self, fn: ast.FunctionDef, droppable: set[str]) -> set[str]:
        """Check migrate() or rollback(); return the tables it creates."""
        scope = self._scope(fn)
        migrator = fn.args.args[0].arg if fn.args.args else "migrator"
        calls = sorted((n for n in ast.walk(fn) if isinstance(n, ast.Call)
                        and isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
                        and n.func.value.id == migrator), key=lambda n: (n.lineno, n.col_offset))
        created: set[str] = set()
        sql: list[tuple[str, int]] = []
        for call in calls:
            method, first = call.func.attr, (call.args[0] if call.args else None)
            table = None
            if method in MODEL_METHODS and first is not None:
                self._check_model_arg(fn.name, method, first, scope)
                # a model the lint cannot resolve is keyed by its text, the same in both functions
                table = scope.table(first) or ast.unparse(first)
            if method in CREATES and table:
                created.add(table)
            elif method in DROPS:
                self._check_drop(fn.name, call, table or "(unknown)", created | droppable)
            elif method == "sql" and first is not None:
                text = self._check_sql_call(call, scope)
                if text is not None:
                    sql.append((text, call.lineno))
            elif table in created:
                continue  # the rules below are about locking tables other sessions use
            elif method in ADDS:
                self._check_added_fields(call, table or "(unknown)")
            else:
                self._check_locking_method(method, call, table or "the table")
        statements = [text for text, _ in sql]
        created |= created_tables(statements)
        self.findings += lint_sql(statements, new_tables=created, droppable_tables=droppable,
                                  allow_destructive=self.allowed,
                                  in_transaction=self.in_transaction, source=self.file,
                                  lines=[line for _, line in sql])
        return created

    def _check_model_arg(self, where: str, method: str, node: ast.expr, scope: _Scope) -> None:
        root = node
        while isinstance(root, ast.Attribute):
            root = root.value
        if not isinstance(root, ast.Name):
            return  # a table name string, or migrator.orm["table"]: this migration's schema
        origin = scope.imports.get(root.id)
        if origin is None and (root is not node or root.id in scope.classes or root.id in scope.names):
            return  # defined or bound in the migration (e.g. Project = migrator.orm["project"])
        name = ast.unparse(node)
        how = f"imported from {origin}" if origin else "not defined in this migration"
        self.add("DM008", node.lineno,
                 f"{where}() passes {name} to migrator.{method} but the class is {how}: the "
                 "application's current model may not match the schema at this migration; "
                 "define the model class in the migration file")

    def _check_drop(self, where: str, call: ast.Call, table: str, droppable: set[str]) -> None:
        if table in droppable:
            return
        what = f"{where}() drops table {table}" + \
            ("" if where == "migrate" else " that its migrate() did not create")
        if self.allowed:
            self.add("DM003", call.lineno, f"{what} (allowed explicitly)", "warning")
        else:
            self.add("DM003", call.lineno,
                     f"{what}, destroying its data: set allow_destructive = True in the migration "
                     "(or pass --allow-destructive) if that is intended")

    def _check_sql_call(self, call: ast.Call, scope: _Scope) -> str | None:
        """Check a migrator.sql call's arguments; return its SQL text when it is a constant."""
        node = scope.value(call.args[0])
        built = _built_from_values(node, scope)
        if built:
            self.add("DM006", call.lineno,
                     f"migrator.sql builds its SQL with {built}: keep the SQL a constant string and "
                     "pass values as parameters, migrator.sql('... WHERE x = %s', value) "
                     "(identifiers cannot be parameters: write them into the string)")
            return None
        text = _constant_str(node, scope)
        if text is None:
            return None
        stray = _STRAY_PERCENT.search(text.replace("%%", ""))
        params = call.args[1:]
        if stray:
            self.add("DM009", call.lineno,
                     "migrator.sql has a literal % that psycopg2 reads as a placeholder and fails "
                     "on: write it as %%")
        elif "%(" not in text and not any(isinstance(p, ast.Starred) for p in params):
            wanted = text.replace("%%", "").count("%s")
            if wanted != len(params):
                self.add("DM009", call.lineno,
                         f"migrator.sql has {wanted} %s placeholder(s) but {len(params)} "
                         "parameter(s): pass one value per %s, as migrator.sql(sql, a, b)")
        return text

    def _check_added_fields(self, call: ast.Call, table: str) -> None:
        allow_not_null = any(k.arg == "allow_not_null" and isinstance(k.value, ast.Constant)
                             and k.value.value is True for k in call.keywords)
        for kw in call.keywords:
            if kw.arg in (None, "allow_not_null") or not isinstance(kw.value, ast.Call):
                continue
            options = {k.arg: k.value for k in kw.value.keywords if k.arg}
            nullable = isinstance(options.get("null"), ast.Constant) and options["null"].value is True
            default = options.get("default")
            has_default = default is not None and not (isinstance(default, ast.Constant)
                                                       and default.value is None)
            kind = ast.unparse(kw.value.func)
            if not nullable and (allow_not_null or not has_default):
                self.add("DM004", kw.value.lineno,
                         f"{table}.{kw.arg} is added NOT NULL without a default in one step: it "
                         "fails on a table with rows; add it null=True with a default, fill "
                         "existing rows with migrator.sql('UPDATE ...'), then SET NOT NULL and DROP "
                         "DEFAULT (migrations/004_fix_sourcedir_language.py)")
            if kind.endswith("ForeignKeyField"):
                self.add("DS102", kw.value.lineno,
                         f"{table}.{kw.arg} adds a foreign key validated at once, locking {table} "
                         f"while every row is checked: {RECIPES['DS102']}")
            if any(isinstance(options.get(k), ast.Constant) and options[k].value is True
                   for k in ("index", "unique")):
                self.add("DS101", kw.value.lineno,
                         f"{table}.{kw.arg} builds an index on existing table {table} without "
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
            self.add("DS104", call.lineno, f"migrator.add_not_null on {table} scans the whole table "
                     f"under an ACCESS EXCLUSIVE lock: {RECIPES['DS104']}")
        elif method == "add_index":
            self.add("DS101", call.lineno, f"migrator.add_index on existing table {table} builds "
                     f"the index without CONCURRENTLY: {RECIPES['DS101']}")


def _is_stringish(node: ast.expr, scope: _Scope) -> bool:
    node = scope.value(node)
    return isinstance(node, ast.JoinedStr) or (isinstance(node, ast.Constant)
                                               and isinstance(node.value, str))


def _built_from_values(node: ast.expr, scope: _Scope) -> str | None:
    """Return how SQL is built from values ("an f-string", ...) or None for a constant or a name."""
    if isinstance(node, ast.JoinedStr) and any(isinstance(v, ast.FormattedValue) for v in node.values):
        return "an f-string"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and _is_stringish(node.left, scope):
        return "% formatting"
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format" and _is_stringish(node.func.value, scope)):
        return ".format()"
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        parts = (scope.value(node.left), scope.value(node.right))
        if any(_built_from_values(p, scope) for p in parts):
            return _built_from_values(parts[0], scope) or _built_from_values(parts[1], scope)
        if any(_constant_str(p, scope) is None for p in parts) and any(_is_stringish(p, scope) for p in parts):
            return "string concatenation"
    return None


def _constant_str(node: ast.expr, scope: _Scope) -> str | None:
    """Return the text of a constant string expression (literals, + of literals), else None."""
    node = scope.value(node)
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
        return "".join(str(v.value) for v in node.values)
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _constant_str(node.left, scope), _constant_str(node.right, scope)
        if left is not None and right is not None:
            return left + right
    return None
