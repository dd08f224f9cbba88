"""What a name or an expression in a migration stands for, read from the AST without running it.

``lint_ast`` asks two questions: which expression a name was last given before a use (a field
passed to ``add_columns``, a model class), and whether the SQL handed to ``migrator.sql`` is a
constant string, built from values (DM006), or something a static lint cannot know. A name is
followed only through assignments that surely run before the use (the same block or an
enclosing one); a name also bound in a branch, a loop or any other way is unknown, never guessed.
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

#: how deep an expression is followed through names and operators before giving up
_MAX_DEPTH = 40


@dataclass(frozen=True)
class StrValue:
    """What a SQL argument is: ``text`` for a constant, ``built`` for how it is built from values."""

    text: str | None = None
    built: str | None = None

    @property
    def unknown(self) -> bool:
        return self.text is None and self.built is None


UNKNOWN = StrValue()


def _position(node: ast.AST) -> tuple[int, int]:
    return (getattr(node, "lineno", 0), getattr(node, "col_offset", 0))


def table_of_class(node: ast.ClassDef) -> str:
    """Return the table a model class maps to (its Meta.table_name, else peewee's default)."""
    for item in node.body:
        if isinstance(item, ast.ClassDef) and item.name == "Meta":
            for stmt in item.body:
                if (isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant)
                        and any(isinstance(t, ast.Name) and t.id == "table_name" for t in stmt.targets)):
                    return str(stmt.value.value)
    # peewee's default table name (legacy_table_names)
    return re.sub(r"[^\w]+", "_", node.name.lower())


class Scope:
    """The names one function (or the module) binds, and what they stand for at a given place."""

    def __init__(self, body_owner: ast.AST, parent: Scope | None = None,
                 imports: dict[str, str] | None = None):
        self.parent = parent
        self.imports: dict[str, str] = imports if imports is not None else (parent.imports if parent else {})
        self.classes: dict[str, ast.ClassDef] = {}
        self.functions: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
        # name -> [(binding statement or node, the list of statements holding it or None)]
        self.bindings: dict[str, list[tuple[ast.AST, int | None]]] = defaultdict(list)
        self._containers: dict[int, int] = {}  # id(statement) -> id(list that holds it)
        self._top = id(getattr(body_owner, "body", None))
        self._parents: dict[int, ast.AST] = {}
        self._index(body_owner)

    # -- indexing ---------------------------------------------------------------------------

    def _index(self, owner: ast.AST) -> None:
        stack: list[ast.AST] = [owner]
        while stack:
            node = stack.pop()
            for _name, value in ast.iter_fields(node):
                if isinstance(value, list):
                    for child in value:
                        if isinstance(child, ast.AST):
                            self._containers[id(child)] = id(value)
                            self._parents[id(child)] = node
                            self._bind(child, id(value))
                            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                      ast.ClassDef, ast.Lambda)):
                                stack.append(child)
                elif isinstance(value, ast.AST):
                    self._parents[id(value)] = node
                    self._bind(value, None)
                    if not isinstance(value, ast.Lambda):
                        stack.append(value)
        if isinstance(owner, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for arg in ast.walk(owner.args):
                if isinstance(arg, ast.arg):
                    self.bindings[arg.arg].append((arg, None))

    def _bind(self, node: ast.AST, container: int | None) -> None:
        if isinstance(node, ast.ClassDef):
            self.classes[node.name] = node
            self.bindings[node.name].append((node, container))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.functions[node.name] = node
            self.bindings[node.name].append((node, container))
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            self._bind_assignment(node, container)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.withitem, ast.NamedExpr,
                               ast.comprehension, ast.ExceptHandler)):
            self._bind_target(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                self.bindings[(alias.asname or alias.name).split(".")[0]].append((node, None))

    def _bind_assignment(self, node: ast.Assign | ast.AugAssign | ast.AnnAssign,
                         container: int | None) -> None:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        for target in targets:
            # a plain `name = ...` can be followed; unpacking and the like cannot
            simple = isinstance(target, ast.Name) and (
                not isinstance(node, ast.AnnAssign) or node.value is not None)
            for name in ast.walk(target):
                if isinstance(name, ast.Name):
                    self.bindings[name.id].append((node if simple else name, container))

    def _bind_target(self, node: ast.AST) -> None:
        """Bind the names a loop, ``with``, walrus, comprehension or ``except`` introduces."""
        target = getattr(node, "target", None) or getattr(node, "optional_vars", None)
        for name in ast.walk(target) if isinstance(target, ast.AST) else ():
            if isinstance(name, ast.Name):
                self.bindings[name.id].append((name, None))
        if isinstance(node, ast.ExceptHandler) and node.name:
            self.bindings[node.name].append((node, None))

    def _enclosing_lists(self, node: ast.AST) -> set[int]:
        """Return the statement lists that hold ``node`` or any of its ancestors."""
        lists = set()
        current: ast.AST | None = node
        while current is not None:
            if id(current) in self._containers:
                lists.add(self._containers[id(current)])
            current = self._parents.get(id(current))
        return lists

    # -- questions --------------------------------------------------------------------------

    def binds(self, name: str) -> bool:
        """True when the name is bound here or in an enclosing scope (any way at all)."""
        return name in self.bindings or (self.parent is not None and self.parent.binds(name))

    def class_named(self, name: str) -> ast.ClassDef | None:
        if name in self.classes:
            return self.classes[name]
        return self.parent.class_named(name) if self.parent else None

    def function_named(self, name: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
        if name in self.functions:
            return self.functions[name]
        return self.parent.function_named(name) if self.parent else None

    def assignments(self, name: str, at: ast.AST | None
                    ) -> list[ast.Assign | ast.AugAssign | ast.AnnAssign] | None:
        """Return the plain assignments to ``name`` that surely ran, in order, before ``at``.

        ``at`` None asks about the whole body (a module has run entirely before its functions
        are called). None when the name is bound in a way that cannot be followed (a branch, a
        loop, a parameter, an import...); the enclosing scope answers for a name not bound here.
        """
        bound = self.bindings.get(name)
        if not bound:
            return self.parent.assignments(name, None) if self.parent else None
        if at is None:
            before, enclosing = bound, {self._top}
        else:
            before = [b for b in bound if _position(b[0]) < _position(at)]
            enclosing = self._enclosing_lists(at)
        if not before:
            return None  # used before it is bound here: not something to follow
        result = []
        for node, box in sorted(before, key=lambda b: _position(b[0])):
            if not isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) or box not in enclosing:
                return None
            result.append(node)
        return result

    def value(self, node: ast.expr, at: ast.AST | None = None) -> ast.expr:
        """Return the expression a name was last given before ``at`` (else the node itself)."""
        seen = 0
        while isinstance(node, ast.Name) and seen < _MAX_DEPTH:
            chain = self.assignments(node.id, at or node)
            if not chain or any(isinstance(s, ast.AugAssign) for s in chain) or chain[-1].value is None:
                return node
            node, at, seen = chain[-1].value, chain[-1], seen + 1
        return node

    def table(self, node: ast.expr, at: ast.AST | None = None) -> str | None:
        """Return the table a model argument names (a table name, a known class, migrator.orm[name])."""
        if isinstance(node, ast.Name) and self.class_named(node.id) is None:
            node = self.value(node, at)
        if isinstance(node, ast.Subscript):  # migrator.orm["table"]
            node = node.slice
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and (known := self.class_named(node.id)) is not None:
            return table_of_class(known)
        return None

    def string(self, node: ast.expr, at: ast.AST | None = None, depth: int = 0) -> StrValue:
        """Return what a SQL argument is: a constant's text, how it is built from values, or unknown."""
        if depth > _MAX_DEPTH:
            return UNKNOWN
        if isinstance(node, ast.Constant):
            return StrValue(text=node.value) if isinstance(node.value, str) else UNKNOWN
        if isinstance(node, ast.JoinedStr):
            if any(isinstance(v, ast.FormattedValue) for v in node.values):
                return StrValue(built="an f-string")
            return StrValue(text="".join(str(getattr(v, "value", "")) for v in node.values))
        if isinstance(node, ast.Name):
            return self._name_string(node, at or node, depth)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod):
            left = self.string(node.left, at, depth + 1)
            return StrValue(built="% formatting") if not left.unknown else UNKNOWN
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self._concatenation(self.string(node.left, at, depth + 1),
                                       self.string(node.right, at, depth + 1))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            receiver = self.string(node.func.value, at, depth + 1)
            if node.func.attr == "format" and not receiver.unknown:
                return StrValue(built=".format()")
            if node.func.attr == "join" and receiver.text is not None:
                return self._join(receiver.text, node.args, at, depth)
        return UNKNOWN

    def _name_string(self, node: ast.Name, at: ast.AST, depth: int) -> StrValue:
        bound = self.bindings.get(node.id)
        if bound:  # a value built from values anywhere before the use is DM006, branch or not
            for stmt, _ in bound:
                if isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and \
                        _position(stmt) < _position(at) and stmt.value is not None:
                    step = self.string(stmt.value, stmt, depth + 1)
                    if isinstance(stmt, ast.AugAssign) and step.built is None:
                        step = self._concatenation(StrValue(text=""), step)
                    if step.built:
                        return step
        chain = self.assignments(node.id, at)
        if not chain:
            return UNKNOWN
        value = UNKNOWN
        for stmt in chain:
            if stmt.value is None:  # `name: str` alone
                return UNKNOWN
            step = self.string(stmt.value, stmt, depth + 1)
            if isinstance(stmt, ast.AugAssign):
                if not isinstance(stmt.op, ast.Add):
                    return StrValue(built="% formatting") if isinstance(stmt.op, ast.Mod) else UNKNOWN
                value = self._concatenation(value, step)
            else:
                value = step
        return value

    @staticmethod
    def _concatenation(left: StrValue, right: StrValue) -> StrValue:
        if left.built or right.built:
            return StrValue(built=left.built or right.built)
        if left.text is not None and right.text is not None:
            return StrValue(text=left.text + right.text)
        if left.text is not None or right.text is not None:
            return StrValue(built="string concatenation")
        return UNKNOWN

    def _join(self, separator: str, args: Iterable[ast.expr], at, depth: int) -> StrValue:
        args = list(args)
        if len(args) == 1 and isinstance(args[0], (ast.List, ast.Tuple)):
            parts = [self.string(e, at, depth + 1) for e in args[0].elts]
            if all(p.text is not None for p in parts):
                return StrValue(text=separator.join(p.text or "" for p in parts))
            return StrValue(built="str.join")
        # joining what peewee generated (throat's "".join(ctx.sql(index)._sql)): nothing shows
        # values in it, nor their absence; a warning that it cannot be read, not an error
        return UNKNOWN
