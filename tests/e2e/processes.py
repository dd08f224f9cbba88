"""Processes the end-to-end tests start: each in its own session, stopped with every descendant."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import REPO, wait_until

READY_TIMEOUT = 60.0


def alive(pid: int) -> bool:
    """Return True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Return the pids of every live descendant of ``pid`` (children first)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop(0)
        found.append(child)
        todo.extend(children.get(child, []))
    return found


def _started(pid: int) -> int | None:
    """Return when ``pid`` started (clock ticks since boot), or None if it is gone: tells reuse apart."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _signal(pids: dict[int, int | None], sig: signal.Signals) -> None:
    for pid, started in pids.items():
        if started is None or _started(pid) != started:
            continue  # gone, or its pid now belongs to another process
        for kill in (os.killpg, os.kill):  # the process's own group or session too
            try:
                kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass


class Service:
    """A process started in its own session with its output in a log file; ``stop()`` ends its tree."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_dir: Path,
                 cwd: Path = REPO):
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out,
                                            stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """Return what the process printed so far."""
        return self.log.read_text(errors="replace")

    def exited(self) -> bool:
        """Return True once the process has ended."""
        return self.process.poll() is not None

    def wait_for_output(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        """Return once ``text`` was printed; raise AssertionError with the log on exit or timeout."""
        wait_until(lambda: text in self.output(), f"{self.log.stem} to print {text!r}",
                   timeout=timeout, gave_up=self.exited, log=self.output)

    def wait_for_exit(self, timeout: float = READY_TIMEOUT) -> int:
        """Return the exit code once the process ended; raise AssertionError with the log otherwise."""
        wait_until(self.exited, f"{self.log.stem} (pid {self.pid}) to exit", timeout=timeout,
                   log=self.output)
        return self.process.returncode

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process and every descendant, SIGKILL what is left after ``grace`` seconds."""
        tree = {pid: _started(pid) for pid in [self.pid, *descendants(self.pid)]}
        _signal(tree, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        tree.update({pid: _started(pid) for pid in descendants(self.pid)})
        _signal(tree, signal.SIGKILL)
        self.process.wait(timeout=10)
