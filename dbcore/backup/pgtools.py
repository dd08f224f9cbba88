"""PostgreSQL client programs (pg_dump, pg_restore) for a server's major version, and how to call them.

Debian puts only a version-picking wrapper on PATH and the real programs in
``/usr/lib/postgresql/N/bin``. The program is chosen by the server's ``server_version_num``,
never by PATH order alone: the server's own major when installed, else a newer one (a newer
pg_dump dumps older servers, a newer pg_restore restores into them), never an older one.
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

from dbcore.connection import Target
from dbcore.errors import ToolNotFound
from dbcore.redact import redact

log = logging.getLogger(__name__)

_VERSION = re.compile(r"\(PostgreSQL\)\s+(\d+)(?:\.(\d+))?")


@dataclass(frozen=True)
class PgTool:
    """A PostgreSQL client program and its version."""

    path: Path
    version: str  # "15.18"

    @property
    def major(self) -> int:
        return int(self.version.split(".")[0])


def major_of_path(path: str) -> int:
    try:
        return int(Path(path).parent.name)
    except ValueError:
        return 0



def _candidate_dirs() -> list[str]:
    dirs = []
    if os.environ.get("PG_BINDIR"):
        dirs.append(os.environ["PG_BINDIR"])
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out = ""
        if out:
            dirs.append(out)
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major_of_path, reverse=True)
    dirs += os.environ.get("PATH", "").split(os.pathsep)
    seen, unique = set(), []
    for folder in dirs:
        if folder and folder not in seen:
            seen.add(folder)
            unique.append(folder)
    return unique


@functools.lru_cache(maxsize=32)
def _probe(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = _VERSION.search(out)
    if not match:
        return None
    return f"{match.group(1)}.{match.group(2) or 0}"


def installed_tools(program: str) -> list[PgTool]:
    """Return every copy of ``program`` found (PG_BINDIR, pg_config --bindir, /usr/lib/postgresql, PATH)."""
    tools, seen = [], set()
    for folder in _candidate_dirs():
        path = Path(folder) / program
        if not (path.is_file() and os.access(path, os.X_OK)):
            continue
        real = str(path.resolve())
        if real in seen:
            continue
        seen.add(real)
        version = _probe(str(path))
        if version:
            tools.append(PgTool(path, version))
    return tools


def find_pg_tool(program: str, server_major: int) -> PgTool:
    """Return ``program`` for a server of major ``server_major``; raise ToolNotFound naming what exists and the fix.

    The server's own major is preferred; otherwise the oldest newer one (pg_dump and pg_restore
    read and write every older server), never an older one (it refuses a newer server).
    """
    tools = installed_tools(program)
    usable = sorted((t for t in tools if t.major >= server_major), key=lambda t: t.major)
    if usable:
        if usable[0].major != server_major:
            log.info("using %s %s for a PostgreSQL %s server (no %s %s found)", program,
                     usable[0].version, server_major, program, server_major)
        return usable[0]
    if not tools:
        raise ToolNotFound(
            f"{program} was not found (PATH, pg_config --bindir, /usr/lib/postgresql/*/bin): "
            f"install postgresql-client-{server_major} or set PG_BINDIR"
        )
    found = ", ".join(f"{t.path} is {t.version}" for t in tools)
    raise ToolNotFound(
        f"the server is PostgreSQL {server_major} but every {program} found is older ({found}): "
        f"install postgresql-client-{server_major} (or newer) or set PG_BINDIR to its bin folder"
    )


def server_major(conn) -> int:
    """Return the major version of the server behind a psycopg2 connection."""
    with conn.cursor() as cur:
        cur.execute("SHOW server_version_num")
        return int(cur.fetchone()[0]) // 10000


def libpq_args(target: Target) -> tuple[str, dict[str, str]]:
    """Return (connection string without the password, environment with PGPASSWORD) for a client program.

    The password goes through the environment, not argv, where `ps` would show it.
    """
    parts = urlsplit(target.url)
    netloc = parts.netloc.rsplit("@", 1)
    if len(netloc) == 2:
        user = netloc[0].split(":", 1)[0]
        parts = parts._replace(netloc=f"{user}@{netloc[1]}")
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "password"]
    parts = parts._replace(query=urlencode(query))
    env = dict(os.environ)
    if target.password:
        env["PGPASSWORD"] = target.password
    env.setdefault("PGCONNECT_TIMEOUT", "10")
    # Built by hand: urlunsplit drops the "//" of a URL with no host (postgres:///db?host=/run/x)
    query_part = f"?{parts.query}" if parts.query else ""
    return f"{parts.scheme}://{parts.netloc}{parts.path}{query_part}", env


def tool_error(stderr: bytes, program: str, password: str | None) -> str:
    """Return the error lines of a client program's stderr as one line, password scrubbed."""
    lines = [line.strip() for line in stderr.decode(errors="replace").splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()] or lines[-3:]
    text = "; ".join(line.removeprefix(f"{program}: ") for line in errors) or "no error output"
    return redact(text, password)
