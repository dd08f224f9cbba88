"""Candidate indexes read from each query's predicates, joins and sort (PostgreSQL's parser, pglast).

Only plain columns are read (``t.col = $1``, ``col > 5``, ``col IN (...)``, ``col = ANY($1)``,
``col IS NULL``, ``a.x = b.y`` in a join, ``ORDER BY col``); expressions (``lower(email)``),
``OR`` branches and ``LIKE`` are not candidates. Columns without a table prefix are matched
against the columns of the query's tables. Candidates are proposals to test, not proposals: the
HypoPG step (:mod:`dbcore.advise.prove`) keeps only the ones the planner uses and that lower a
cost by the margin.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pglast
from pglast import ast
from pglast.enums import A_Expr_Kind
from pglast.parser import ParseError

#: the widest candidate index (like Dexter: wider ones rarely pay for their writes)
MAX_COLUMNS = 3
_RANGE_OPS = {"<", ">", "<=", ">="}


@dataclass(frozen=True)
class Candidate:
    """An index to try: a table and its columns, in order."""

    table: str
    columns: tuple[str, ...]

    @property
    def definition(self) -> str:
        cols = ", ".join(_quote(c) for c in self.columns)
        return f"CREATE INDEX ON {_quote(self.table)} ({cols})"

    @property
    def name(self) -> str:
        return f"{self.table}_{'_'.join(self.columns)}_idx"[:63]


def _quote(name: str) -> str:
    return name if name.isidentifier() and name.islower() else '"' + name.replace('"', '""') + '"'


@dataclass
class _Scope:
    """What one SELECT / UPDATE / DELETE reads: its tables by alias, and the columns it filters on."""

    aliases: dict[str, str] = field(default_factory=dict)  # alias or name -> table
    equal: dict[str, list[str]] = field(default_factory=dict)  # table -> columns, in order seen
    ranged: dict[str, list[str]] = field(default_factory=dict)
    joined: dict[str, list[str]] = field(default_factory=dict)
    sort: list[tuple[str, str]] = field(default_factory=list)  # (table, column)


def parse(sql: str) -> list[ast.Node]:
    """Return the statements of ``sql``; raise pglast's ParseError."""
    return [raw.stmt for raw in pglast.parse_sql(sql) if raw.stmt is not None]


def param_count(sql: str) -> int:
    """Return the highest ``$n`` of ``sql`` (0 when it has none)."""
    highest = 0
    for stmt in parse(sql):
        for node in _walk(stmt):
            if isinstance(node, ast.ParamRef) and node.number:
                highest = max(highest, node.number)
    return highest


def tables_of(sql: str) -> set[str]:
    """Return the names of the tables ``sql`` reads (without schema)."""
    try:
        return {n.relname for stmt in parse(sql) for n in _walk(stmt)
                if isinstance(n, ast.RangeVar) and n.relname}
    except ParseError:
        return set()


def _walk(node) -> Iterator:
    if isinstance(node, ast.Node):
        yield node
        for name in node:
            yield from _walk(getattr(node, name))
    elif isinstance(node, (tuple, list)):
        for item in node:
            yield from _walk(item)


def _collect_tables(node, scope: _Scope) -> None:
    if isinstance(node, ast.RangeVar) and node.relname:
        alias = node.alias.aliasname if node.alias and node.alias.aliasname else node.relname
        scope.aliases[alias] = node.relname
        scope.aliases.setdefault(node.relname, node.relname)
    elif isinstance(node, ast.JoinExpr):
        _collect_tables(node.larg, scope)
        _collect_tables(node.rarg, scope)
    elif isinstance(node, (tuple, list)):
        for item in node:
            _collect_tables(item, scope)


def _column(node, scope: _Scope, columns: dict[str, set[str]]) -> tuple[str, str] | None:
    """Return (table, column) of a plain column reference, or None."""
    if isinstance(node, ast.TypeCast):  # col::text
        node = node.arg
    if not isinstance(node, ast.ColumnRef) or not all(isinstance(f, ast.String) for f in node.fields or ()):
        return None
    parts = [str(f.sval) for f in node.fields or ()]
    if not parts:
        return None
    if len(parts) >= 2:
        table = scope.aliases.get(parts[-2])
        return (table, parts[-1]) if table else None
    owners = [t for t in set(scope.aliases.values()) if parts[0] in columns.get(t, ())]
    return (owners[0], parts[0]) if len(owners) == 1 else None


def _is_value(node) -> bool:
    """True for a constant, a parameter, or an expression of those (never a column)."""
    if isinstance(node, (tuple, list)):
        return all(_is_value(n) for n in node)
    return not any(isinstance(n, (ast.ColumnRef, ast.SubLink)) for n in _walk(node))


def _add(bucket: dict[str, list[str]], table: str, column: str) -> None:
    cols = bucket.setdefault(table, [])
    if column not in cols:
        cols.append(column)


def _predicates(node, scope: _Scope, columns: dict[str, set[str]]) -> None:
    if isinstance(node, ast.BoolExpr):
        if node.boolop == 0:  # AND: each side narrows; OR and NOT are not indexable as a whole
            for arg in node.args or ():
                _predicates(arg, scope, columns)
    elif isinstance(node, ast.NullTest):
        col = _column(node.arg, scope, columns)
        if col:
            _add(scope.equal, *col)
    elif isinstance(node, ast.A_Expr):
        _comparison(node, scope, columns)


def _comparison(node: ast.A_Expr, scope: _Scope, columns: dict[str, set[str]]) -> None:
    """Place one ``a OP b``: a join (two tables' columns), an equality or a range on a value."""
    op = str(node.name[-1].sval) if node.name else ""
    left, right = _column(node.lexpr, scope, columns), _column(node.rexpr, scope, columns)
    if node.kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_BETWEEN_SYM):
        if left and _is_value(node.rexpr):
            _add(scope.ranged, *left)
        return
    if node.kind not in (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY, A_Expr_Kind.AEXPR_IN):
        return
    if left and right:
        if op == "=" and left[0] != right[0]:
            _add(scope.joined, *left)
            _add(scope.joined, *right)
        return
    col, other = (left, node.rexpr) if left else (right, node.lexpr)
    if col is None or not _is_value(other):
        return
    if op == "=":
        _add(scope.equal, *col)
    elif op in _RANGE_OPS and node.kind == A_Expr_Kind.AEXPR_OP:
        _add(scope.ranged, *col)


def _scope_of(stmt, columns: dict[str, set[str]]) -> _Scope | None:
    scope = _Scope()
    if isinstance(stmt, ast.SelectStmt):
        if stmt.op != 0:  # UNION etc.: its arms are scopes of their own
            return None
        _collect_tables(stmt.fromClause, scope)
        where = stmt.whereClause
        for join in _walk(stmt.fromClause):
            if isinstance(join, ast.JoinExpr) and join.quals is not None:
                _predicates(join.quals, scope, columns)
        for sort in stmt.sortClause or ():  # SortBy nodes
            col = _column(sort.node, scope, columns)
            if col:
                scope.sort.append(col)
    elif isinstance(stmt, (ast.UpdateStmt, ast.DeleteStmt)):
        _collect_tables(stmt.relation, scope)
        _collect_tables(getattr(stmt, "fromClause", None) or getattr(stmt, "usingClause", None), scope)
        where = stmt.whereClause
    else:
        return None
    if where is not None:
        _predicates(where, scope, columns)
    return scope


def _order_by_distinct(cols: list[str], table: str, distinct: dict[tuple[str, str], float]) -> list[str]:
    """Most selective column first (the planner's n_distinct), the order written otherwise."""
    return sorted(cols, key=lambda c: -distinct.get((table, c), 0.0))


def candidates_of(sql: str, columns: dict[str, set[str]],
                  distinct: dict[tuple[str, str], float] | None = None) -> list[Candidate]:
    """Return the candidate indexes of one query (empty when it cannot be parsed).

    ``columns``: the columns of every table (to place unqualified names and to skip views);
    ``distinct``: (table, column) -> estimated distinct values, to order equality columns.
    """
    distinct = distinct or {}
    try:
        statements = parse(sql)
    except ParseError:
        return []
    found: list[Candidate] = []
    for stmt in statements:
        for node in _walk(stmt):
            scope = _scope_of(node, columns)
            if scope is not None:
                for cand in _of_scope(scope, columns, distinct):
                    if cand not in found:
                        found.append(cand)
    return found


def _of_scope(scope: _Scope, columns: dict[str, set[str]],
              distinct: dict[tuple[str, str], float]) -> Iterator[Candidate]:
    """Yield the candidates of one SELECT / UPDATE / DELETE, table by table."""
    def make(table: str, cols: list[str]) -> Iterator[Candidate]:
        cols = list(dict.fromkeys(cols))[:MAX_COLUMNS]
        if cols and table in columns and all(c in columns[table] for c in cols):
            yield Candidate(table, tuple(cols))

    tables = set(scope.equal) | set(scope.ranged) | set(scope.joined) | {t for t, _ in scope.sort}
    for table in sorted(tables):
        equal = _order_by_distinct(scope.equal.get(table, []), table, distinct)
        for col in equal:
            yield from make(table, [col])
        yield from make(table, equal)
        for col in scope.ranged.get(table, []):
            yield from make(table, [col])
            yield from make(table, [*equal, col])
        for col in scope.joined.get(table, []):
            yield from make(table, [col])
            if equal:
                yield from make(table, [col, *equal])
        sort = [c for t, c in scope.sort if t == table]
        if sort and len(sort) == len(scope.sort):  # every sort key on this one table
            yield from make(table, [*equal, *sort])
