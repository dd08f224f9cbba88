"""Reading a migration's syntax tree: calls in source order, names bound to the migrator, idioms.

Small helpers shared by the rules in ``dbcore/lint/ast_rules.py``; nothing here judges anything.
"""

from __future__ import annotations

import ast
from typing import TypeGuard

#: migrator methods that create a table (``@migrator.create_model`` decorates a class)
CREATES = {"create_model", "create_table"}


def is_trivial(body: list[ast.stmt]) -> bool:
    """True for a body of only a docstring, ``pass`` and ``...``."""
    return all(isinstance(s, ast.Pass)
               or (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)) for s in body)


def rollback_gap(source: str) -> str | None:
    """Return why a migration's rollback() cannot undo it: "missing" or "empty" while migrate()
    does something; None when it has one (or migrate() does nothing, or the file does not parse)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    migrate, rollback = functions.get("migrate"), functions.get("rollback")
    if migrate is None or is_trivial(migrate.body):
        return None
    if rollback is None:
        return "missing"
    return "empty" if is_trivial(rollback.body) else None


def position(node: ast.AST) -> tuple[int, int]:
    return (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))


def calls_in_order(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> list[ast.Call]:
    """Return the calls of a function's own body in source order (nested defs and classes aside)."""
    calls, stack = [], list(fn.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(node, ast.Call):
            calls.append(node)
        stack.extend(ast.iter_child_nodes(node))  # type: ignore[arg-type]  # every child of a statement list
    return sorted(calls, key=position)


def aliases(fn: ast.AST, names: set[str]) -> set[str]:
    """Return ``names`` and every name assigned one of them (``mg = migrator``), in ``fn``."""
    names = set(names)
    assigns = [n for n in ast.walk(fn) if isinstance(n, (ast.Assign, ast.NamedExpr))]
    while True:
        more = {t.id for n in assigns if isinstance(n.value, ast.Name) and n.value.id in names
                for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
                if isinstance(t, ast.Name)} - names
        if not more:
            return names
        names |= more


def is_migrator_create(node: ast.expr, migrator: set[str]) -> bool:
    """True for a ``@migrator.create_model`` (or ``create_table``) decorator, called or not."""
    node = node.func if isinstance(node, ast.Call) else node
    return (isinstance(node, ast.Attribute) and node.attr in CREATES
            and isinstance(node.value, ast.Name) and node.value.id in migrator)


def is_call_of(node: ast.AST, attr: str) -> TypeGuard[ast.Call]:
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == attr


def listed(call: ast.Call) -> list[ast.expr]:
    """The elements of a call's first argument when it is a literal list or tuple."""
    first = call.args[0] if call.args else None
    return list(first.elts) if isinstance(first, (ast.List, ast.Tuple)) else []


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    return next((k.value for k in call.keywords if k.arg == name), None)
