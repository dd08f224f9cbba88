"""Run code under review in a child process: a fresh interpreter whose environment is set at exec.

Migration files and the application's modules are the team's code, but code under review: before
an approval it must not be able to reach production by accident (an app module that connects to
``DATABASE_URL`` at import, a migration that fixes data through the app's own models). Every place
such code runs before the approval (loading the files, importing the models, the rehearsal) runs
here, with an environment that names the rehearsal copy, or no database at all. The apply runs
here too, with the run's own environment: a migration that calls ``os._exit`` or is killed by a
signal then ends the child, not the run, and the parent reports it naming the file; the parent
also enforces the deadline, from outside the migration code.

Why not ``multiprocessing``'s spawn context: it starts its child with the parent's environment
as it is at that moment; giving the child another one means changing the parent's ``os.environ``,
which other threads (Prefect's, another run's in a served process) read meanwhile. A
``subprocess`` exec with an explicit ``env`` never touches the parent's. The two ends talk over a
``multiprocessing.connection.Connection`` on a socket pair: the call and its arguments, log
records and events up, the result or the error back.

This stops careless code, not a hostile migration: the child could still read its parent's
memory or environment through /proc. Migration files are reviewed code (docs/deploy.md).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

from dbcore.errors import ChildDeadline, ChildEnded, DbcoreError

#: URL schemes of a PostgreSQL database: a variable holding one is never passed to code under review
_DB_SCHEMES = ("postgres://", "postgresql://", "postgresqlext://", "postgres+", "postgresql+")

#: the open channel to the parent, in a child only
_CHANNEL: Connection | None = None
_SEND_LOCK = threading.Lock()


def child_env(*, database_url: str | None = None, secrets: tuple[str, ...] | list[str] = (),
              base: dict[str, str] | None = None) -> dict[str, str]:
    """Return an environment for code under review: no variable names a database but ``database_url``.

    Every variable holding a PostgreSQL URL, or any of ``secrets`` (the target's password), is
    dropped; with ``database_url`` (the rehearsal copy) ``DATABASE_URL`` and each variable dropped
    for holding a URL (a fleet's url_env, a targets file's names) point at it instead.
    """
    env = dict(os.environ if base is None else base)
    secrets = [s for s in secrets if s and len(s) >= 4]
    pointed = {"DATABASE_URL"}
    for name, value in list(env.items()):
        lowered = value.strip().lower()
        holds_url = any(scheme in lowered for scheme in _DB_SCHEMES)
        if holds_url or any(s in value for s in secrets):
            del env[name]
            if holds_url:
                pointed.add(name)
    env.pop("DATABASE_URL", None)
    if database_url:
        env.update({name: database_url for name in pointed})
    return env


def in_child() -> bool:
    """Return True in a child started by :func:`run_in_child`."""
    return _CHANNEL is not None


def emit(kind: str, value: Any) -> None:
    """Send an event to the parent (a migration starting, a session's backend pid); no-op outside a child."""
    if _CHANNEL is None:
        return
    with _SEND_LOCK:
        try:
            _CHANNEL.send(("event", (kind, value)))
        except (OSError, ValueError):  # the parent is gone: nothing to tell
            pass


def report_backend(pid: int) -> None:
    """Tell the parent the backend pid of a session this child opened (ended at the deadline)."""
    emit("backend", pid)


class _Forward(logging.Handler):
    """Sends the child's dbcore log records to the parent, formatted (their args may not pickle)."""

    def emit(self, record: logging.LogRecord) -> None:
        channel = _CHANNEL
        if channel is None:
            return
        try:
            record.msg, record.args = record.getMessage(), None
            record.exc_info = record.exc_text = record.stack_info = None
            with _SEND_LOCK:
                channel.send(("log", record))
        except Exception:  # noqa: BLE001 - a log line is never worth failing the work
            pass


def _child_main(fd: int) -> None:
    """The child's side: read the call, run it, send back the result or the error."""
    global _CHANNEL
    _CHANNEL = conn = Connection(fd)
    sys.path[:0] = [p for p in conn.recv() if p not in sys.path]
    dbcore_log = logging.getLogger("dbcore")
    dbcore_log.addHandler(_Forward())
    dbcore_log.setLevel(logging.INFO)
    dbcore_log.propagate = False  # the parent prints or stores it
    try:
        func, args, kwargs = conn.recv()
        answer = ("result", func(*args, **kwargs))
    except SystemExit as exc:  # sys.exit() outside a migration's own wrapper: still a failure
        answer = ("exit", f"called sys.exit({exc.code!r})")
    except BaseException as exc:  # noqa: BLE001 - every error goes back to the parent
        answer = ("error", exc)
    with _SEND_LOCK:
        try:
            try:
                conn.send(answer)
            except (OSError, EOFError):
                raise
            except Exception:  # noqa: BLE001 - an error that does not pickle: its type and text
                conn.send(("error", DbcoreError(f"{type(answer[1]).__name__}: {answer[1]}")))
        except (OSError, EOFError):  # the parent is gone: nobody to tell
            pass
    conn.close()


def _describe_end(returncode: int | None) -> str:
    if returncode is None:
        return "stopped answering"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode} (os._exit, or a crash)"


def _start(env: dict[str, str] | None) -> tuple[subprocess.Popen, Connection]:
    """Start the child interpreter; return it and this end of its channel."""
    parent_sock, child_sock = socket.socketpair()
    try:
        child_fd = child_sock.fileno()
        proc = subprocess.Popen(
            [sys.executable, "-c", f"from dbcore.sandbox import _child_main; _child_main({child_fd})"],
            env=env, pass_fds=[child_fd], stdin=subprocess.DEVNULL)
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()
    return proc, Connection(parent_sock.detach())


def _reap(proc: subprocess.Popen) -> None:
    """Wait for the child to end (it has answered, or it is being abandoned), killing it at worst."""
    if proc.poll() is None:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class _Waiter:
    """The parent's side of one call: reads what the child sends until its answer, or its end."""

    def __init__(self, proc: subprocess.Popen, conn: Connection, what: str, deadline: float | None,
                 on_event: Callable[[str, Any], None] | None,
                 on_deadline: Callable[[tuple], None] | None) -> None:
        self.proc, self.conn, self.what, self.deadline = proc, conn, what, deadline
        self.on_event, self.on_deadline = on_event, on_deadline
        self.ends_at = None if deadline is None else time.monotonic() + deadline
        self.events: list[tuple[str, Any]] = []

    def answer(self) -> Any:
        while True:
            wait = 1.0 if self.ends_at is None else max(0.0, min(1.0, self.ends_at - time.monotonic()))
            if not self.conn.poll(wait):
                self._check_deadline()
                continue
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                raise self._ended() from None
            if kind == "result":
                return value
            self._handle(kind, value)

    def _handle(self, kind: str, value: Any) -> None:
        if kind == "log":
            logging.getLogger(value.name).handle(value)
        elif kind == "event":
            self.events.append(value)
            if self.on_event is not None:
                self.on_event(*value)
        elif kind == "exit":
            raise ChildEnded(f"{self.what}: the code {value}", reason=value, events=tuple(self.events))
        else:  # "error"
            raise value

    def _check_deadline(self) -> None:
        if self.ends_at is None or time.monotonic() < self.ends_at:
            return
        if self.on_deadline is not None:
            self.on_deadline(tuple(self.events))
        self.proc.kill()
        self.proc.wait()
        reason = f"ran past its deadline of {self.deadline:g}s"
        raise ChildDeadline(f"{self.what} {reason}", reason=reason, events=tuple(self.events))

    def _ended(self) -> ChildEnded:
        try:
            returncode = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            returncode = None
        reason = _describe_end(returncode)
        return ChildEnded(f"{self.what} {reason}", reason=reason, events=tuple(self.events))


def run_in_child(func: Callable, *args, env: dict[str, str] | None, what: str,
                 deadline: float | None = None, on_event: Callable[[str, Any], None] | None = None,
                 on_deadline: Callable[[tuple], None] | None = None, **kwargs) -> Any:
    """Call ``func(*args, **kwargs)`` in a fresh child process with environment ``env``; return its result.

    ``env`` None is this process's own. ``func`` and its arguments are pickled (``func`` by
    reference: a module-level function). The child's dbcore log records are handled here; its
    events go to ``on_event``. An error the child raises is raised here. When the child ends
    without an answer, ChildEnded says how (``what`` names the work: "the rehearsal"); past
    ``deadline`` seconds ``on_deadline`` is called with the events seen (to end the child's
    database sessions), the child is killed and ChildDeadline is raised.
    """
    proc, conn = _start(env)
    try:
        conn.send(list(sys.path))
        conn.send((func, args, kwargs))
        return _Waiter(proc, conn, what, deadline, on_event, on_deadline).answer()
    finally:
        conn.close()
        _reap(proc)
