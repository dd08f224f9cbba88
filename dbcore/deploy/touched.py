"""The tables a plan touches: read from its files (before anything ran) or from the SQL it sent.

The preflight looks for sessions that hold or wait for locks on these tables. Both readings err
on the side of more tables: a name too many makes the preflight look at one table more, a name
too few would let a blocker through. ``None`` means "cannot tell": every table counts.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from typing import Iterable

from pglast import parser as pg_parser

_PLACEHOLDER = re.compile(r"%\(\w+\)s|%s")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def tables_in_sql(statements: Iterable[str]) -> set[str] | None:
    """Return every table named by ``statements`` (captured SQL, ``-- params:`` allowed); None if one does not parse."""
    tables: set[str] = set()
    for statement in statements:
        # psycopg2's placeholders are not SQL: a NULL parses wherever a value may stand
        text = _PLACEHOLDER.sub("NULL", statement.split(" -- params: ")[0]).replace("%%", "%")
        try:
            tree = json.loads(pg_parser.parse_sql_json(text))
        except pg_parser.ParseError:
            return None
        _collect_relnames(tree, tables)
    return tables


def _collect_relnames(node, into: set[str]) -> None:
    if isinstance(node, dict):
        # a RangeVar, wrapped ({"RangeVar": {...}}) or, in a typed field, bare
        if isinstance(node.get("relname"), str):
            into.add(node["relname"])
        for value in node.values():
            _collect_relnames(value, into)
    elif isinstance(node, list):
        for value in node:
            _collect_relnames(value, into)


def _default_table_name(class_name: str) -> str:
    # peewee's default (legacy_table_names): the class name lower-cased
    return class_name.lower()


def tables_in_files(paths: Iterable[Path]) -> set[str] | None:
    """Return the tables the migration files name (models, table names, orm[...], SQL); None if unreadable."""
    tables: set[str] = set()
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_text(), str(path))
        except (OSError, SyntaxError, ValueError, UnicodeDecodeError):
            return None
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.bases:
                tables.add(_default_table_name(node.name))
            elif isinstance(node, ast.Assign) and (name := _string(node.value)) and any(
                    isinstance(t, ast.Name) and t.id == "table_name" for t in node.targets):
                tables.add(name)
            elif isinstance(node, ast.Subscript) and (name := _string(node.slice)) and \
                    isinstance(node.value, ast.Attribute) and node.value.attr == "orm":
                tables.add(_default_table_name(name))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                literal = _string(node.args[0]) if node.args else None
                if node.func.attr == "sql":
                    found = tables_in_sql([literal]) if literal is not None else None
                    if found is None:
                        return None
                    tables |= found
                elif literal is not None:  # migrator.add_index("table", ...), migrator.drop_table("x")
                    tables.add(literal)
    return {t for t in tables if _IDENTIFIER.fullmatch(t)}


def _string(node: ast.AST) -> str | None:
    """Return the string ``node`` is a literal of, or None."""
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def tables_of_plan(paths: Iterable[Path], captured: Iterable[str] | None = None) -> set[str] | None:
    """Return the tables a plan touches: from the SQL the rehearsal ``captured`` when there is
    some, else from its files; None when neither can tell."""
    if captured is not None:
        found = tables_in_sql(captured)
        if found is not None:
            return found
    return tables_in_files(paths)


_CREATES = {"create_model", "create_table"}
_DROPS = {"remove_model", "drop_table"}


def _class_table(node: ast.ClassDef) -> str:
    """The table of a model class: its ``Meta.table_name``, else peewee's default."""
    for item in node.body:
        if isinstance(item, ast.ClassDef) and item.name == "Meta":
            for assign in item.body:
                if isinstance(assign, ast.Assign) and (name := _string(assign.value)) and any(
                        isinstance(t, ast.Name) and t.id == "table_name" for t in assign.targets):
                    return name
    return _default_table_name(node.name)


def _sql_tables(text: str) -> tuple[set[str], set[str]]:
    """The tables a literal SQL text creates and drops (what pglast can read of it)."""
    created: set[str] = set()
    dropped: set[str] = set()
    try:
        tree = json.loads(pg_parser.parse_sql_json(_PLACEHOLDER.sub("NULL", text).replace("%%", "%")))
    except pg_parser.ParseError:
        return created, dropped
    for raw in tree.get("stmts", []):
        stmt = raw.get("stmt", {})
        if "CreateStmt" in stmt:
            created.add(stmt["CreateStmt"]["relation"]["relname"])
        elif "DropStmt" in stmt and stmt["DropStmt"].get("removeType") == "OBJECT_TABLE":
            for names in stmt["DropStmt"].get("objects", []):
                items = names.get("List", {}).get("items", [])
                if items:
                    dropped.add(items[-1].get("String", {}).get("sval", ""))
    return created, dropped


def _creates(decorator: ast.expr) -> bool:
    """Whether a class decorator is ``@migrator.create_model`` (or ``create_table``), called or not."""
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr in _CREATES


def tables_created_by_files(paths: Iterable[Path]) -> set[str]:
    """Return the tables the migration files create and that a later one of them does not drop.

    Read from each file's ``migrate()`` (``@migrator.create_model`` classes, ``create_model(X)``,
    literal ``CREATE TABLE`` SQL); what the code does not spell out literally is not counted.
    """
    tables: set[str] = set()
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_bytes(), str(path))
        except (OSError, SyntaxError, ValueError):
            continue
        classes = {n.name: _class_table(n) for n in ast.walk(tree) if isinstance(n, ast.ClassDef)}
        forward = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "migrate"]
        for node in (inner for f in forward for inner in ast.walk(f)):  # not rollback()'s drops
            if isinstance(node, ast.ClassDef) and any(_creates(d) for d in node.decorator_list):
                tables.add(classes[node.name])
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
                first, attr = node.args[0], node.func.attr
                literal = _string(first)
                model = (classes.get(first.id, _default_table_name(first.id))
                         if isinstance(first, ast.Name) else None)
                if attr in _CREATES and model:
                    tables.add(model)
                elif attr in _DROPS and (literal or model):
                    tables.discard(literal or model or "")
                elif attr == "sql" and literal is not None:
                    created, dropped = _sql_tables(literal)
                    tables = (tables | created) - dropped
    return {t for t in tables if t and _IDENTIFIER.fullmatch(t)}
