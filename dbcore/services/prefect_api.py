"""A local Prefect API and UI for `make run`: ``prefect server start`` on 127.0.0.1, kept running.

Without ``PREFECT_API_URL`` every ``python flows/migrate.py`` would start Prefect's temporary API
of its own (seconds, each run: bench/RESULTS.md "Time to plan"), and a run paused for approval
could be resumed only through that temporary address. One server under ``.local/prefect``,
started once by ``python -m dbcore.services up`` and found through ``.local/services.json``, serves
every terminal run, ``flows/approve.py`` and the UI. Its own process: dbcore never imports Prefect.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from dbcore.errors import ConfigError
from dbcore.ports import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: `prefect server start` is healthy in 4-11 s here (measured on 2 cores), slower on a fresh PREFECT_HOME
START_TIMEOUT = 120.0
STOP_TIMEOUT = 15.0


@dataclass
class PrefectApiServer:
    """``prefect server start`` with its state (SQLite database, logs) under ``root``."""

    root: Path
    port: int | None = None
    pid: int | None = None

    def __post_init__(self) -> None:
        self.root = Path(self.root).absolute()
        self._load_state()

    @property
    def state_file(self) -> Path:
        return self.root / "server.json"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    @property
    def api_url(self) -> str:
        return f"http://{HOST}:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _load_state(self) -> None:
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.port, self.pid = state.get("port"), state.get("pid")

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({"pid": self.pid, "port": self.port}))

    def _healthy(self) -> bool:
        if not self.port:
            return False
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def is_running(self) -> bool:
        """Return True when the recorded process is alive and is a Prefect server of this root."""
        self._load_state()
        if not self.pid:
            return False
        try:
            args = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace")
            env = Path(f"/proc/{self.pid}/environ").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
        # a recycled pid belongs to some other program: only ours has this PREFECT_HOME
        return "server" in args and f"PREFECT_HOME={self.root}" in env

    def start(self) -> None:
        """Start the server (or adopt the one running under ``root``); wait until it is healthy."""
        if self.is_running():
            self._wait_until_healthy(None)
            log.info("Prefect API already running on %s (pid %s)", self.api_url, self.pid)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(PREFECT_HOME=str(self.root), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   DO_NOT_TRACK="1", PREFECT_UI_API_URL=self.api_url)
        prefect = Path(sys.executable).parent / "prefect"
        with open(self.log_file, "ab") as out:
            # its own session: it outlives `make run`'s process and a Ctrl-C in that terminal
            proc = subprocess.Popen([str(prefect), "server", "start", "--host", HOST, "--port",
                                     str(self.port)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = proc.pid
        self._save_state()
        self._wait_until_healthy(proc)
        log.info("Prefect API started on %s (pid %s)", self.api_url, self.pid)

    def _wait_until_healthy(self, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._healthy():
            exited = proc.poll() is not None if proc else not self.is_running()
            if exited or time.monotonic() > deadline:
                self.stop()
                tail = self.log_file.read_text(errors="replace")[-1500:] if self.log_file.exists() else ""
                raise ConfigError(f"the local Prefect API did not start (see {self.log_file}): {tail.strip()}")
            time.sleep(0.3)

    def stop(self) -> None:
        """Stop the server and everything it started (its process group): SIGTERM, then SIGKILL."""
        pid = self.pid
        if pid is not None and self.is_running():
            for sig, grace in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pid, sig)
                except ProcessLookupError:
                    break
                deadline = time.monotonic() + grace
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not _alive(pid):
                    break
        self.pid = None
        if self.root.exists():
            self._save_state()


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
