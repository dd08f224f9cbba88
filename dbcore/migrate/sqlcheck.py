"""The apply sends what the rehearsal sent: statements normalised, compared before each COMMIT.

The approver reads the SQL the rehearsal captured on the copy; the apply must send that SQL and
no other. :class:`SameSqlAsRehearsed` is a runner observer (dbcore.migrate.observe): in a batch
it compares each migration's statements with the rehearsal's right before the COMMIT (a
difference rolls the whole batch back: nothing changed); an ``atomic = False`` migration commits
as it goes, so each of its statements is compared before it is sent.

How statements are judged (docs/deploy.md):

- Normalised first: bound values dropped (they are parameters, not SQL), savepoint names
  replaced (peewee makes them up per run), whitespace collapsed.
- Schema statements (everything that is not data or transaction control) must be the same
  sequence, text for text: what the approver read is what runs.
- Data statements (SELECT, INSERT, UPDATE, DELETE, WITH, COPY) are judged by their shape, with
  literals and the length of IN (...) / VALUES lists blanked: how many there are and with which
  values is not compared, because production's rows moved on since the backup the copy was
  made from (a loop over rows sends one UPDATE per row). A shape the rehearsal never sent stops
  the apply: it is SQL nobody reviewed.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable, Mapping, Sequence

from dbcore.errors import SqlDiffers
from dbcore.migrate.observe import RunObserver, Statement
from dbcore.migrate.plan import MigrationResult, Phase

_PARAMS = " -- params: "
_SAVEPOINT = re.compile(
    r'\b(SAVEPOINT|RELEASE SAVEPOINT|ROLLBACK TO SAVEPOINT|RELEASE|ROLLBACK TO)\s+("[^"]+"|\w+)',
    re.IGNORECASE)
_DATA = {"select", "insert", "update", "delete", "with", "copy", "values", "table", "merge"}
_CONTROL = {"savepoint", "release", "rollback", "begin", "commit", "start", "end"}
_STRING = re.compile(r"'(?:[^']|'')*'")
_NUMBER = re.compile(r"(?<![\w\"$])-?\d+(?:\.\d+)?\b")
_LIST = re.compile(r"\(\s*(\?|%s)(\s*,\s*(\?|%s))*\s*\)")
_ROWS = re.compile(r"(\(\?\))(\s*,\s*\(\?\))+")


def normalise(captured: str) -> str:
    """Return a captured statement without its bound values, savepoint names or extra whitespace."""
    sql = captured.split(_PARAMS, 1)[0]
    sql = _SAVEPOINT.sub(lambda m: f"{m.group(1).upper()} sp", sql)
    return " ".join(sql.split()).rstrip(";").strip()


def kind(sql: str) -> str:
    """Return "data", "control" (transaction control) or "schema" for a normalised statement."""
    first = sql.lstrip("( ").split(" ", 1)[0].lower()
    if first in _CONTROL:
        return "control"
    return "data" if first in _DATA else "schema"


def shape(sql: str) -> str:
    """Return a data statement's shape: literals and the length of value lists blanked."""
    sql = _STRING.sub("?", sql)
    sql = _NUMBER.sub("?", sql)
    sql = _LIST.sub("(?)", sql)
    return _ROWS.sub(r"\1", sql)


def judged(statements: Iterable[str]) -> tuple[list[str], set[str]]:
    """Return (the schema statements in order, the set of data shapes) of captured statements."""
    schema, data = [], set()
    for captured in statements:
        sql = normalise(captured)
        what = kind(sql)
        if what == "schema":
            schema.append(sql)
        elif what == "data":
            data.add(shape(sql))
    return schema, data


def sql_digest(results: Sequence[MigrationResult]) -> str:
    """Return a digest of what the rehearsal sent, judged as above (the plan's fingerprint covers it)."""
    data = []
    for r in results:
        schema, shapes = judged(r.sql)
        data.append([r.name, schema, sorted(shapes)])
    return hashlib.sha256(json.dumps(data).encode()).hexdigest()


def _short(sql: str, limit: int = 160) -> str:
    return sql if len(sql) <= limit else sql[:limit - 3] + "..."


class SameSqlAsRehearsed(RunObserver):
    """Stops the apply where it would send other SQL than the rehearsal did (see the module's doc).

    ``rehearsed`` maps each migration's name to the statements the rehearsal captured; a
    migration missing from it (not rehearsed) is not compared.
    """

    def __init__(self, rehearsed: Mapping[str, Sequence[str]]) -> None:
        self.rehearsed = {name: judged(sql) for name, sql in rehearsed.items()}
        self.committed: list[str] = []
        self._sent: dict[str, list[str]] = {}

    def _differs(self, migration: str, what: str, phase: Phase) -> SqlDiffers:
        if phase.atomic:
            kept = (f"; already committed before it: {', '.join(self.committed)}" if self.committed
                    else "; nothing was changed (the whole batch was rolled back)")
        else:
            before = f"; committed before it: {', '.join(self.committed)}" if self.committed else ""
            kept = ("; stopped there (atomic = False commits as it goes: what it sent before is "
                    f"committed){before}")
        return SqlDiffers(f"apply of {migration} {what}{kept}: did a file it reads change after "
                          "the plan? run again and approve the new plan", committed=self.committed)

    def statement_started(self, statement: Statement) -> None:
        name = statement.migration
        if name not in self.rehearsed:
            return
        sql = normalise(statement.sql)
        what = kind(sql)
        schema, shapes = self.rehearsed[name]
        if what == "data" and shape(sql) not in shapes:
            raise self._differs(name, f"would send a data statement the rehearsal did not: "
                                      f"`{_short(sql)}`", statement.phase)
        if what != "schema":
            return
        sent = self._sent.setdefault(name, [])
        index = len(sent)
        if statement.phase.atomic:  # a batch is compared before its COMMIT, whole
            sent.append(sql)
            return
        if index >= len(schema) or schema[index] != sql:
            expected = f"`{_short(schema[index])}`" if index < len(schema) else "nothing more"
            raise self._differs(name, f"would send `{_short(sql)}` where the rehearsal sent "
                                      f"{expected}", statement.phase)
        sent.append(sql)

    def _compare(self, name: str, phase: Phase) -> None:
        if name not in self.rehearsed:
            return
        schema, _ = self.rehearsed[name]
        sent = self._sent.get(name, [])
        for index in range(max(len(sent), len(schema))):
            got = sent[index] if index < len(sent) else None
            want = schema[index] if index < len(schema) else None
            if got != want:
                got_text = f"`{_short(got)}`" if got is not None else "nothing"
                want_text = f"`{_short(want)}`" if want is not None else "nothing more"
                raise self._differs(name, f"sent {got_text} where the rehearsal sent {want_text} "
                                          f"(schema statement {index + 1})", phase)

    def before_commit(self, phase, results, db) -> None:
        for name in phase.names:
            self._compare(name, phase)

    def phase_done(self, phase, results) -> None:
        if not phase.atomic:  # what it left out can only be said now: it committed as it went
            for name in phase.names:
                self._compare(name, phase)
        self.committed.extend(phase.names)


def rehearsed_sql(results: Sequence[MigrationResult]) -> dict[str, tuple[str, ...]]:
    """Return each rehearsed migration's captured statements, by name (what :class:`SameSqlAsRehearsed` takes)."""
    return {r.name: tuple(r.sql) for r in results}
