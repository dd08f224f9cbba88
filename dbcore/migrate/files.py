"""Migration files and what the database knows of them: discovery, compiling, status, ``new``.

Applying and rolling back live in ``dbcore/migrate/runner.py``; this module only reads.
"""

from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import peewee

from dbcore.errors import ChildEnded, ConfigError, MigrationExited, MigrationFileError
from dbcore.migrate.history import read_applied
from dbcore.sandbox import child_env, emit, run_in_child

#: peewee-migrate's own file mask: three digits, an underscore, a name
FILE_RE = re.compile(r"^(\d{3})_([^.]+)\.py$")


@dataclass(frozen=True)
class MigrationFile:
    """A migration file on disk: its name (stem), path, sha256 and whether it runs in the batch transaction."""

    name: str
    path: Path
    sha256: str
    atomic: bool = True
    #: why the file cannot be compiled (a syntax error), or None
    error: str | None = None

    @property
    def number(self) -> int:
        return int(self.name[:3])


@dataclass(frozen=True)
class LoadedMigration:
    """A compiled migration file: its ``migrate`` and ``rollback`` functions."""

    file: MigrationFile
    migrate: Callable[..., Any]
    rollback: Callable[..., Any] | None
    #: the module's namespace (what it imported and defined)
    scope: dict = field(default_factory=dict, repr=False, compare=False)


@dataclass(frozen=True)
class MigrationStatus:
    """One line of ``dbmigrate status``."""

    name: str
    applied: bool
    applied_at: datetime.datetime | None
    changed: bool
    checksum: str | None
    recorded_checksum: str | None
    file_missing: bool = False
    error: str | None = None

    def to_dict(self) -> dict:
        data = asdict(self)
        data["applied_at"] = self.applied_at.isoformat() if self.applied_at else None
        return data


def _declares_non_atomic(source: str, path: Path) -> bool:
    """Return True when the module sets ``atomic = False`` at top level (read by AST, not run)."""
    try:
        tree = ast.parse(source, filename=str(path))
    except SyntaxError as exc:
        raise MigrationFileError(_syntax_message(path, exc)) from None
    for node in tree.body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        if any(isinstance(t, ast.Name) and t.id == "atomic" for t in targets):
            value = getattr(node, "value", None)
            return isinstance(value, ast.Constant) and value.value is False
    return False


#: what is never an input of a plan: Python's caches, editors' and version control's files
_NOT_INPUTS = ("__pycache__", ".git", ".hg", ".svn", ".mypy_cache", ".pytest_cache", ".ruff_cache")


def folder_inputs(migrations_dir: Path) -> tuple[tuple[str, str], ...]:
    """Return (path, sha256) of every file the migrations may read, in order.

    That is every file under the migrations folder (the migrations, SQL and data files they
    open, helper modules) and under a ``checks`` folder beside it, if there is one; paths are
    relative to the folder holding both. Compiled caches and version-control folders are left out.
    """
    migrations_dir = Path(migrations_dir)
    base = migrations_dir.parent
    found = []
    for folder in (migrations_dir, base / "checks"):
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*")):
            parts = path.relative_to(folder).parts
            if (not path.is_file() or any(p in _NOT_INPUTS for p in parts)
                    or path.suffix in (".pyc", ".pyo") or path.name.endswith(("~", ".swp"))):
                continue
            found.append((path.relative_to(base).as_posix(),
                          hashlib.sha256(path.read_bytes()).hexdigest()))
    return tuple(found)


def _syntax_message(path: Path, exc: SyntaxError) -> str:
    return (f"migration {path.name} has a syntax error at line {exc.lineno}: {exc.msg}: "
            "fix the file; nothing was applied")


def discover(migrations_dir: Path) -> list[MigrationFile]:
    """Return the migration files in order; raise ConfigError when the folder does not exist."""
    migrations_dir = Path(migrations_dir)
    if not migrations_dir.is_dir():
        # peewee-migrate would silently create it: a mistyped path must not "work"
        raise ConfigError(
            f"migrations folder {migrations_dir} does not exist: pass --migrations-dir "
            "or set MIGRATE_MIGRATIONS_DIR"
        )
    files = []
    for path in sorted(migrations_dir.iterdir()):
        if FILE_RE.match(path.name):
            # A broken file is recorded, not raised: `status` and `new` must still work;
            # planning it (load) refuses.
            try:
                source = read_source(path)
            except MigrationFileError as exc:
                files.append(MigrationFile(name=path.stem, path=path, atomic=True, error=str(exc),
                                           sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
                continue
            try:
                atomic, error = not _declares_non_atomic(source, path), None
            except MigrationFileError as exc:
                atomic, error = True, str(exc)
            files.append(MigrationFile(
                name=path.stem, path=path, sha256=hashlib.sha256(source.encode()).hexdigest(),
                atomic=atomic, error=error,
            ))
    return files


def read_source(path: Path) -> str:
    """Return a migration file's text; raise MigrationFileError (one line) when it is not UTF-8."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        data = path.read_bytes()
        line = data[:exc.start].count(b"\n") + 1
        raise MigrationFileError(
            f"migration {path.name} is not UTF-8 text (byte 0x{data[exc.start]:02x} at line {line}): "
            "save it as UTF-8; nothing was applied") from None


def load(file: MigrationFile) -> LoadedMigration:
    """Compile and execute a migration file's module; raise MigrationFileError naming the file."""
    source = read_source(file.path)
    try:
        # Compiled under its real file name, so that tracebacks and errors point at it.
        code = compile(source, str(file.path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        raise MigrationFileError(_syntax_message(file.path, exc)) from None
    scope: dict[str, Any] = {"__file__": str(file.path), "__name__": f"migration_{file.name}"}
    try:
        exec(code, scope)
    except SystemExit as exc:  # sys.exit() at module level: a failure, never a quiet end
        raise MigrationFileError(
            f"migration {file.path.name} calls sys.exit({exc.code!r}) on load: remove it; "
            "nothing was applied") from None
    except Exception as exc:  # a broken import or module-level code
        raise MigrationFileError(
            f"migration {file.path.name} fails on load: {type(exc).__name__}: {exc}: fix the "
            "file; nothing was applied"
        ) from exc
    migrate = scope.get("migrate")
    if not callable(migrate):
        raise MigrationFileError(
            f"migration {file.path.name} has no migrate(migrator, database, *, fake=False) "
            "function: add one (`dbmigrate new` writes the template)"
        )
    rollback = scope.get("rollback")
    return LoadedMigration(file, _no_exit(file, migrate, "migrate()"),
                           _no_exit(file, rollback, "rollback()") if callable(rollback) else None,
                           scope)


def review_env(*secrets: str | None, database_url: str | None = None) -> dict[str, str]:
    """Return the environment of code under review: no database at all, or only ``database_url`` (a copy).

    ``secrets`` are the target's passwords: a variable holding one is left out too.
    """
    return child_env(database_url=database_url, secrets=[s for s in secrets if s])


def _load_each(files: list[MigrationFile]) -> None:
    """(In the child.) Compile and run each file's module, announcing it first."""
    for f in files:
        emit("loading", f.name)
        load(f)


def load_checked(files: list[MigrationFile], env: dict[str, str], deadline: float) -> None:
    """Load every file in a child process with environment ``env``; raise MigrationFileError naming one.

    Module-level code of a migration (and whatever it imports) runs there, never in this process:
    before an approval ``env`` names no database (:func:`review_env`).
    """
    if not files:
        return
    try:
        run_in_child(_load_each, list(files), env=env, what="loading the migration files",
                     deadline=deadline)
    except ChildEnded as exc:
        loading = [v for k, v in exc.events if k == "loading"]
        name = f"{loading[-1]}.py" if loading else "a migration file"
        raise MigrationFileError(f"migration {name}: the process loading it {exc.reason}: remove "
                                 "what ends the process from its module-level code; nothing was "
                                 "applied") from None


def _no_exit(file: MigrationFile, function: Callable[..., Any], what: str) -> Callable[..., Any]:
    """Return ``function`` with a SystemExit it raises turned into MigrationExited (an error)."""

    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except SystemExit as exc:
            raise MigrationExited(f"{what} of {file.path.name} called sys.exit({exc.code!r}): "
                                  "a migration ends by returning or raising") from None

    return functools.wraps(function)(call)


def status(db: peewee.Database, migrations_dir: Path) -> list[MigrationStatus]:
    """Return every migration, applied or pending, in order; applied ones missing on disk last."""
    files = discover(migrations_dir)
    applied = {a.name: a for a in read_applied(db)}
    rows = []
    for file in files:
        done = applied.pop(file.name, None)
        rows.append(MigrationStatus(
            name=file.name, applied=done is not None,
            applied_at=done.applied_at if done else None,
            changed=bool(done and done.checksum and done.checksum != file.sha256),
            checksum=file.sha256, recorded_checksum=done.checksum if done else None,
            error=file.error,
        ))
    for gone in applied.values():
        rows.append(MigrationStatus(
            name=gone.name, applied=True, applied_at=gone.applied_at, changed=False,
            checksum=None, recorded_checksum=gone.checksum, file_missing=True,
        ))
    return rows


TEMPLATE = '''\
"""{number:03d}: {title}.

Runs inside the batch transaction: if any statement fails, nothing of the batch is applied.
Set ``atomic = False`` only for statements PostgreSQL refuses inside a transaction
(CREATE INDEX CONCURRENTLY); such a migration runs alone (see docs/migrations.md).
"""

import peewee as pw


# Define here the model classes this migration touches (the guide's rule): only the fields it
# needs and Meta.table_name. They are never bound to a database.
class BaseModel(pw.Model):
    created_at = pw.DateTimeField()
    updated_at = pw.DateTimeField()


# class MyModel(BaseModel):
#     field = pw.CharField()
#
#     class Meta:
#         table_name = "my_table"


def migrate(migrator, database, *, fake=False):
    """{title}."""
    # migrator.add_columns(MyModel, new_field=pw.CharField(max_length=2, null=True, default="el"))
    # migrator.sql("UPDATE my_table SET new_field = %s WHERE new_field IS NULL", "el")
    # migrator.sql("ALTER TABLE my_table ALTER COLUMN new_field SET NOT NULL")
    # migrator.sql("ALTER TABLE my_table ALTER COLUMN new_field DROP DEFAULT")
    raise NotImplementedError("write migrate() of {filename}")


def rollback(migrator, database, *, fake=False):
    """Undo {title}."""
    # migrator.drop_columns(MyModel, "new_field")
    raise NotImplementedError("write rollback() of {filename}")
'''


def slugify(title: str) -> str:
    """Return a file-name-safe snake_case form of a migration title."""
    slug = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
    if not slug:
        raise ConfigError(f"migration name {title!r} has no letters or digits: use e.g. \"add user email\"")
    return slug[:60]


def new_migration(migrations_dir: Path, title: str) -> Path:
    """Write the next sequential ``NNN_name.py`` from the template and return its path."""
    migrations_dir = Path(migrations_dir)
    files = discover(migrations_dir)
    number = max((f.number for f in files), default=0) + 1
    if number > 999:
        raise ConfigError("migration numbers are three digits and 999 is taken: squash old migrations")
    slug = slugify(title)
    path = migrations_dir / f"{number:03d}_{slug}.py"
    if path.exists():
        raise ConfigError(f"{path} already exists")
    path.write_text(TEMPLATE.format(number=number, title=title.strip(), filename=path.name),
                    encoding="utf-8")
    return path
