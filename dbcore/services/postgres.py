"""A private PostgreSQL cluster (initdb + pg_ctl) for tests and the embedded `make run` default.

The server refuses to run as root, so as root every server command runs as the ``postgres``
user through ``runuser`` and the data folder is handed to that user.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from dbcore.backup.pgtools import major_of_path
from dbcore.errors import ConfigError
from dbcore.ports import free_port

SERVER_USER = "postgres"


def find_pg_bindir(program: str = "initdb") -> Path:
    """Return the folder holding PostgreSQL's server programs, newest major version first."""
    candidates = []
    if os.environ.get("PG_BINDIR"):
        candidates.append(os.environ["PG_BINDIR"])
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major_of_path, reverse=True)
    on_path = shutil.which(program)
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if (Path(folder) / program).exists():
            return Path(folder)
    raise ConfigError(
        f"PostgreSQL's {program} was not found: install the server "
        "(apt-get install postgresql) or set PG_BINDIR"
    )


def preloadable(library: str) -> bool:
    """Return True when the server's lib folder holds ``library`` (contrib may be absent)."""
    return (find_pg_bindir("postgres").parent / "lib" / f"{library}.so").exists()


def _as_server_user(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", SERVER_USER, "--", *cmd]
    return cmd


def server_user_can_reach(path: Path) -> bool:
    """Return True when the server's user may enter every folder down to ``path`` (always, unless root)."""
    if os.geteuid() != 0:
        return True
    folder = Path(path).resolve()
    while not folder.exists():
        folder = folder.parent
    result = subprocess.run(["runuser", "-u", SERVER_USER, "--", "test", "-x", str(folder)],
                            capture_output=True)
    return result.returncode == 0


def _hand_to_server_user(path: Path) -> None:
    if os.geteuid() == 0:
        shutil.chown(path, SERVER_USER, SERVER_USER)


@dataclass
class PostgresCluster:
    """A cluster in ``datadir`` served on 127.0.0.1:``port``, trust auth for user postgres."""

    root: Path
    port: int = 0

    def __post_init__(self) -> None:
        # the server runs with its own working directory: every path it is given is absolute
        self.root = Path(self.root).resolve()

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "log" / "postgres.log"

    @property
    def sockdir(self) -> Path:
        return self.root / "sock"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgres://postgres@127.0.0.1:{self.port}/{dbname}"

    def _run(self, cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(
            _as_server_user(cmd), check=True, capture_output=True, text=True, **kwargs
        )

    def init(self) -> None:
        """Create the cluster if ``datadir`` holds none."""
        if (self.datadir / "PG_VERSION").exists():
            return
        bindir = find_pg_bindir()
        for folder in (self.root, self.datadir, self.logfile.parent, self.sockdir):
            folder.mkdir(parents=True, exist_ok=True)
            _hand_to_server_user(folder)
        os.chmod(self.datadir, 0o700)
        try:
            self._run([str(bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                       "--auth=trust", "-E", "UTF8", "--no-locale"])
        except subprocess.CalledProcessError as exc:
            detail = (exc.stderr or exc.stdout or "").strip().splitlines()
            raise ConfigError(f"initdb in {self.datadir} failed: "
                              f"{detail[-1] if detail else exc.returncode}") from None

    def is_running(self) -> bool:
        """Return True when the server of this cluster is up."""
        if not (self.datadir / "postmaster.pid").exists():
            return False
        result = subprocess.run(
            _as_server_user([str(find_pg_bindir("pg_ctl") / "pg_ctl"), "-D", str(self.datadir),
                             "status"]),
            capture_output=True, text=True,
        )
        if result.returncode != 0:
            return False
        lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        if len(lines) > 3:
            self.port = int(lines[3])
        return True

    def start(self, *, fast: bool = False) -> None:
        """Start the server (``fast``: fsync off, for throw-away test clusters)."""
        if self.is_running():
            return
        if not self.port:
            self.port = free_port()
        options = f"-p {self.port} -k {self.sockdir} -c listen_addresses=127.0.0.1"
        if preloadable("pg_stat_statements"):  # the queries `dbmigrate suggest-indexes` reads
            options += " -c shared_preload_libraries=pg_stat_statements"
        if fast:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        try:
            self._run([str(find_pg_bindir("pg_ctl") / "pg_ctl"), "-D", str(self.datadir),
                       "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start"])
        except subprocess.CalledProcessError as exc:
            tail = self.logfile.read_text()[-2000:] if self.logfile.exists() else exc.stderr
            raise ConfigError(f"PostgreSQL did not start on port {self.port}: {tail.strip()}") from exc

    def stop(self) -> None:
        """Stop the server if it runs (fast shutdown: connected sessions are ended)."""
        if not (self.datadir / "postmaster.pid").exists():
            return
        subprocess.run(
            _as_server_user([str(find_pg_bindir("pg_ctl") / "pg_ctl"), "-D", str(self.datadir),
                             "-m", "fast", "-w", "stop"]),
            capture_output=True, text=True,
        )
