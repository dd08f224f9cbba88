"""The team's own checks of the data a migration produced: ``verify()`` and ``migrations/checks/*.sql``.

- A migration may define ``def verify(database):`` (peewee-migrate ignores it, so the file stays
  portable). It passes when it returns None, True or an empty list. It fails when it returns
  False, a list of offending primary keys, or a query (a peewee query or a SQL string) that
  returns rows, or when it raises (``assert`` included).
- ``migrations/checks/*.sql``: each file holds a query that must return no row; its leading
  ``--`` comment says what it guards.

They run read-only (a check that writes fails), under the settings' statement timeout, on the
rehearsal's copy after the migrations and on the live database right after the apply. What a
failure shows is the check's name, the count of offending rows and at most five of their primary
keys: the first column of a query's rows, shown only when it is a primary key column of its
table; never other column values, nor an exception's message (either may hold production data).

``MIGRATE_VERIFY_COMMAND``, the team's own command (smoke tests), runs on the rehearsal's copy
only, with DATABASE_URL set to the copy and MIGRATE_VERIFY_TIMEOUT seconds to finish.
"""

from __future__ import annotations

import ast
import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import peewee
import psycopg2

from dbcore.connection import Target, connect
from dbcore.redact import mask_url, redact
from dbcore.settings import Settings

CHECKS_FOLDER = "checks"
_URL_IN_COMMAND = re.compile(r"postgres(?:ql)?://\S+")
MAX_KEYS = 5


@dataclass(frozen=True)
class DataCheckResult:
    """One check's outcome: offending rows (count, at most five primary keys) or why it could not run."""

    name: str  # "003_add_project_slug.py verify()", "checks/slugs_unique.sql"
    guards: str = ""
    offending: int = 0
    keys: tuple[str, ...] = ()
    keys_hidden: bool = False  # the first column is not a primary key: no value shown
    error: str = ""  # the check itself failed (raised, refused, timed out)

    @property
    def ok(self) -> bool:
        return not self.offending and not self.error

    def describe(self) -> str:
        what = f"check {self.name}" + (f" ({self.guards})" if self.guards else "")
        if self.error:
            return f"{what} failed: {self.error}"
        if self.ok:
            return f"{what} passed"
        keys = ""
        if self.keys:
            more = ", ..." if self.offending > len(self.keys) else ""
            keys = f"; primary keys {', '.join(self.keys)}{more}"
        elif self.keys_hidden:
            keys = "; its first column is not a primary key, so no value is shown"
        return f"{what} failed: {self.offending} offending row(s){keys}"

    def to_dict(self) -> dict:
        return {**asdict(self), "keys": list(self.keys), "ok": self.ok, "message": self.describe()}


@dataclass(frozen=True)
class CommandResult:
    """The team's verify command on the copy: its exit code (its output is not kept: it may hold data)."""

    command: str
    returncode: int | None  # None: stopped at the time limit
    seconds: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def describe(self) -> str:
        if self.returncode is None:
            return f"MIGRATE_VERIFY_COMMAND `{self.command}` did not finish within its time limit"
        if self.detail:
            return f"MIGRATE_VERIFY_COMMAND `{self.command}` {self.detail}"
        verdict = "passed" if self.ok else (f"failed (exit {self.returncode}; its output is in "
                                            "the log of the process that ran it)")
        return f"MIGRATE_VERIFY_COMMAND `{self.command}` {verdict} in {self.seconds:.1f}s"

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok, "message": self.describe()}


@dataclass(frozen=True)
class DataCheckReport:
    """Every data check of one database, and the verify command where it ran."""

    results: tuple[DataCheckResult, ...] = ()
    command: CommandResult | None = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results) and (self.command is None or self.command.ok)

    @property
    def failures(self) -> list[str]:
        found = [r.describe() for r in self.results if not r.ok]
        if self.command is not None and not self.command.ok:
            found.append(self.command.describe())
        return found

    def to_dict(self) -> dict:
        return {"ok": self.ok, "results": [r.to_dict() for r in self.results],
                "command": self.command.to_dict() if self.command else None}

    def text(self) -> str:
        if not self.results and self.command is None:
            return "no data checks (no verify() in these migrations, no migrations/checks/*.sql)"
        lines = [f"data checks: {sum(r.ok for r in self.results)} of {len(self.results)} passed"]
        lines += [f"  {r.describe()}" for r in self.results if not r.ok]
        if self.command is not None:
            lines.append(f"  {self.command.describe()}")
        return "\n".join(lines)

    def to_markdown(self) -> str:
        if not self.results and self.command is None:
            return "### No data checks"
        verdict = "passed" if self.ok else "**failed**"
        parts = [f"### Data checks {verdict}", "", "| check | guards | offending rows | primary keys |",
                 "|---|---|---|---|"]
        for r in self.results:
            keys = ", ".join(r.keys) if r.keys else ("not shown" if r.keys_hidden else "")
            rows = r.error.replace("|", "\\|") if r.error else str(r.offending)
            parts.append(f"| {r.name} | {r.guards.replace('|', '/')} | {rows} | {keys} |")
        if self.command is not None:
            parts += ["", self.command.describe()]
        return "\n".join(parts)


# -- finding the checks


def _leading_comment(sql: str) -> str:
    lines = []
    for line in sql.strip().splitlines():
        if not line.strip().startswith("--"):
            break
        lines.append(line.strip().lstrip("-").strip())
    return " ".join(x for x in lines if x)


def sql_checks(migrations_dir: Path) -> list[Path]:
    """Return the SQL check files of ``migrations_dir/checks`` (sorted)."""
    folder = Path(migrations_dir) / CHECKS_FOLDER
    return sorted(folder.glob("*.sql")) if folder.is_dir() else []


def defines_verify(path: Path) -> bool:
    """Return True when the migration file defines a top-level ``verify`` function."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), str(path))
    except (SyntaxError, OSError, UnicodeDecodeError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == "verify" for n in tree.body)


@dataclass(frozen=True)
class DataChecks:
    """What to check: the ``verify()`` of the migrations just applied, every SQL check file, and
    (on the rehearsal's copy only) the team's command."""

    migrations: tuple[Path, ...] = ()
    sql_files: tuple[Path, ...] = ()
    command: str = ""
    command_timeout: float = 600.0
    statement_timeout: str = "5min"

    @classmethod
    def of(cls, settings: Settings, migrations: Iterable[Path], *, rehearsal: bool) -> DataChecks:
        """Return the checks of a plan's migration files (the verify command only on a rehearsal)."""
        return cls(tuple(p for p in migrations if defines_verify(p)),
                   tuple(sql_checks(settings.migrations_dir)),
                   settings.verify_command if rehearsal else "", settings.verify_timeout,
                   settings.statement_timeout)

    @property
    def empty(self) -> bool:
        return not (self.migrations or self.sql_files or self.command)

    def run(self, target: Target) -> DataCheckReport:
        """Run every check on ``target`` (read-only) and the command; return the report."""
        results = [self._verify(target, path) for path in self.migrations]
        for path in self.sql_files:
            results.append(self._sql_file(target, path))
        command = (run_verify_command(self.command, target, self.command_timeout)
                   if self.command else None)
        return DataCheckReport(tuple(results), command)

    # -- one check

    def _read_only(self, target: Target) -> peewee.PostgresqlDatabase:
        db = connect(target, "dbmigrate data checks")
        db.execute_sql("SET default_transaction_read_only = on")
        db.execute_sql("SELECT set_config('statement_timeout', %s, false)", (self.statement_timeout,))
        return db

    def _sql_file(self, target: Target, path: Path) -> DataCheckResult:
        name = f"{CHECKS_FOLDER}/{path.name}"
        try:
            sql = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return DataCheckResult(name, error=f"cannot read it ({type(exc).__name__})")
        guards = _leading_comment(sql)
        body = sql.strip().rstrip(";").strip()
        db = self._read_only(target)
        try:
            return _offending(db, body, name, guards, target)
        finally:
            db.close()

    def _verify(self, target: Target, path: Path) -> DataCheckResult:
        name = f"{path.name} verify()"
        doc = ""
        try:
            namespace: dict = {"__file__": str(path), "__name__": f"dbmigrate_verify_{path.stem}"}
            exec(compile(path.read_text(encoding="utf-8"), str(path), "exec"), namespace)  # noqa: S102
            verify = namespace["verify"]
            doc = (verify.__doc__ or "").strip().splitlines()[0] if verify.__doc__ else ""
        except Exception as exc:  # noqa: BLE001 - reported as this check's failure
            return DataCheckResult(name, error=f"cannot load it ({type(exc).__name__})")
        db = self._read_only(target)  # every statement its own read-only transaction
        try:
            try:
                outcome = verify(db)
            except Exception as exc:  # noqa: BLE001 - the team's code: any raise is a failure
                return DataCheckResult(name, doc, error=_where_raised(exc, path))
            return _judge(db, outcome, name, doc, target)
        finally:
            db.close()


def _pgcode(exc: BaseException) -> str | None:
    """Return the SQLSTATE of a psycopg2 error, or of the one peewee wrapped (its ``orig``)."""
    for candidate in (exc, getattr(exc, "orig", None), exc.__cause__, exc.__context__):
        code = getattr(candidate, "pgcode", None)
        if code:
            return code
    return None


def _where_raised(exc: BaseException, path: Path) -> str:
    """Name the exception's type and the line of the file it came from: never its message."""
    line = next((f.lineno for f in reversed(traceback.extract_tb(exc.__traceback__))
                 if f.filename == str(path)), None)
    if isinstance(exc, psycopg2.Error) or isinstance(exc, peewee.PeeweeException):
        code = _pgcode(exc)
        return f"the database refused its query{f' (SQLSTATE {code})' if code else ''}" + (
            f" at {path.name}:{line}" if line else "")
    return f"raised {type(exc).__name__}" + (f" at {path.name}:{line}" if line else "") + \
        " (its message is not shown: it may hold data)"


def _judge(db: peewee.Database, outcome: object, name: str, doc: str, target: Target) -> DataCheckResult:
    if outcome is None or outcome is True:
        return DataCheckResult(name, doc)
    if outcome is False:
        return DataCheckResult(name, doc, error="returned False")
    if isinstance(outcome, str) or hasattr(outcome, "sql"):
        if hasattr(outcome, "sql"):  # compiled for this database (the migration's models are unbound)
            sql, params = db.get_sql_context().sql(outcome).query()
        else:
            sql, params = outcome, ()
        return _offending(db, sql, name, doc, target, params)
    if isinstance(outcome, (list, tuple, set)):
        keys = [str(k) for k in list(outcome)[:MAX_KEYS] if isinstance(k, (int, str))]
        return DataCheckResult(name, doc, len(outcome), tuple(keys), keys_hidden=not keys and bool(outcome))
    return DataCheckResult(name, doc, error=f"returned a {type(outcome).__name__}: return None, "
                                            "a query, or a list of primary keys")


def _offending(db: peewee.Database, sql: str, name: str, guards: str, target: Target,
               params: tuple | list = ()) -> DataCheckResult:
    """Run the check's query: count its rows, read at most five first-column values if they are
    a primary key."""
    wrapped = f"SELECT count(*) OVER (), offending.* FROM ({sql}) AS offending LIMIT {MAX_KEYS}"
    try:
        cursor = db.cursor()  # psycopg2's own: a check's LIKE 'x%' with no parameters stays as written
        if params:
            cursor.execute(wrapped, tuple(params))
        else:
            cursor.execute(wrapped)
        rows = cursor.fetchall()
        description = cursor.description
        is_key = bool(rows) and len(description) > 1 and _is_primary_key(
            db, getattr(description[1], "table_oid", None), getattr(description[1], "table_column", None))
    except (peewee.PeeweeException, psycopg2.Error) as exc:
        code = _pgcode(exc)
        detail = redact(str(exc).strip().splitlines()[0] if str(exc).strip() else "",
                        target.password)
        # PostgreSQL's message may quote a value (a failed cast): only its code and first words
        return DataCheckResult(name, guards, error=f"its query failed (SQLSTATE {code}): "
                                                   f"{detail.split(':')[0][:80]}")
    if not rows:
        return DataCheckResult(name, guards)
    count = int(rows[0][0])
    keys = tuple(str(r[1]) for r in rows) if is_key else ()
    return DataCheckResult(name, guards, count, keys, keys_hidden=not is_key)


def _is_primary_key(db: peewee.Database, table_oid: int | None, column: int | None) -> bool:
    if not table_oid or not column:
        return False
    cursor = db.execute_sql("SELECT EXISTS (SELECT 1 FROM pg_index WHERE indrelid = %s AND indisprimary "
                            "AND %s::int2 = ANY(indkey))", (table_oid, column))
    return bool(cursor.fetchone()[0])


def run_verify_command(command: str, target: Target, timeout: float) -> CommandResult:
    """Run the team's command with DATABASE_URL set to ``target`` (the copy); never raises.

    Its output goes to this process's stderr (the terminal, the worker's log), never into the
    report: smoke tests may print rows of the copy, which is production's data.
    """
    env = {**os.environ, "DATABASE_URL": target.url}
    # the report names it, never a password in it (a URL's, masked in the URL, or any secret in play)
    shown = redact(_URL_IN_COMMAND.sub(lambda found: mask_url(found.group(0)), command))
    started = time.monotonic()
    try:
        proc = subprocess.Popen(shlex.split(command), env=env, stdout=sys.stderr, stderr=sys.stderr,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        return CommandResult(shown, 127, 0.0, f"cannot start it: {exc.strerror}")
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        if proc.poll() is None or code is None:  # stopped with everything it started
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return CommandResult(shown, code, round(time.monotonic() - started, 3))
