"""The tunnel of the proxy environment: start it, health-check it, always stop it.

The tunnel is whatever ``MIGRATE_PROXY_COMMAND`` says (``fly proxy {local_port}:5432 --app {app}``
by default; tests use a TCP forwarder). The command is split with ``shlex`` and run without a
shell, in its own session and process group, so that closing it stops everything it started; its
output goes through a pipe that a thread drains (a chatty tunnel never blocks) into a short
in-memory tail that errors quote, passwords scrubbed.

Rules decided here:

- Local port. ``open_tunnel(local_port=...)`` wins over ``MIGRATE_PROXY_LOCAL_PORT``; either pins
  the port, and a pinned port that is already in use before start is a ``ConfigError`` (another
  `fly proxy` left in a terminal would otherwise answer our health checks). ``0`` picks a free
  port for this run.
- Database URL. In the proxy environment ``DATABASE_URL`` names the database as Fly sees it
  (``...@my-db.flycast:5432/app`` or ``.internal``), which a laptop cannot reach: the only way in
  is the tunnel's local end. ``Tunnel.target_for`` keeps the user, password, database name and
  query options and always replaces host and port with 127.0.0.1 and the tunnel's port (and drops
  ``host``/``hostaddr``/``port`` query options, which libpq would prefer over the URL's host).
- Closing. ``close()`` sends SIGTERM to the group, then SIGKILL after ``CLOSE_GRACE`` seconds;
  it is idempotent, runs on leaving a ``with`` block however it is left (KeyboardInterrupt
  included), and once more at interpreter exit for a tunnel nobody closed.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import socket
import string
import subprocess
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit, urlunsplit

from dbcore.connection import Env, Target
from dbcore.errors import ConfigError, TunnelError
from dbcore.ports import free_port
from dbcore.redact import redact
from dbcore.settings import Settings

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
#: seconds between SIGTERM and SIGKILL when closing (read at close time)
CLOSE_GRACE = 5.0
#: seconds close() waits for the local port to be released after SIGKILL
PORT_RELEASE_WAIT = 2.0
#: how often the start waits re-check the port
POLL_INTERVAL = 0.05
#: lines of the command's output kept for error messages
OUTPUT_LINES = 50
PLACEHOLDERS = ("local_port", "app")
FIX = "is flyctl installed and logged in? run `fly auth login` and check MIGRATE_PROXY_APP"


def tunnel_command(settings: Settings, local_port: int) -> list[str]:
    """Return the tunnel's argv with {local_port} and {app} filled in; raise ConfigError if malformed."""
    try:
        template = shlex.split(settings.proxy_command)
        # each word is formatted after splitting: an app name cannot inject extra arguments
        fields = {name for word in template
                  for _, name, _, _ in string.Formatter().parse(word) if name is not None}
    except ValueError as exc:
        raise ConfigError(f"MIGRATE_PROXY_COMMAND cannot be parsed: {exc}: check its quotes "
                          "and braces") from None
    if not template:
        raise ConfigError("MIGRATE_PROXY_COMMAND is empty: set it to the command that opens the "
                          "tunnel, e.g. fly proxy {local_port}:5432 --app {app}")
    unknown = sorted(fields - set(PLACEHOLDERS))
    if unknown:
        raise ConfigError(f"MIGRATE_PROXY_COMMAND has unknown placeholder(s) {unknown}: "
                          "use only {local_port} and {app}")
    if "app" in fields and not settings.proxy_app:
        raise ConfigError("MIGRATE_PROXY_APP is not set: the tunnel command needs {app}, "
                          "the Fly app of the PostgreSQL cluster")
    return [word.format(local_port=local_port, app=settings.proxy_app) for word in template]


def local_target(target: Target | str, local_port: int) -> Target:
    """Return ``target`` (a Target or a URL; a URL is taken as proxy) pointed at 127.0.0.1:local_port."""
    if isinstance(target, str):
        target = Target(Env.PROXY, target)
    parts = urlsplit(target.url)
    userinfo, at, _ = parts.netloc.rpartition("@")
    netloc = f"{userinfo}{at}{LOCALHOST}:{local_port}"
    query = "&".join(pair for pair in parts.query.split("&")
                     if pair and pair.partition("=")[0] not in ("host", "hostaddr", "port"))
    return Target(target.env, urlunsplit(parts._replace(netloc=netloc, query=query)))


class Tunnel:
    """A running tunnel command listening on 127.0.0.1:``local_port``; a context manager that closes it."""

    def __init__(self, process: subprocess.Popen, program: str, local_port: int,
                 secrets: tuple[str | None, ...] = ()) -> None:
        self.process = process
        self.program = program
        self.local_port = local_port
        self._output: deque[str] = deque(maxlen=OUTPUT_LINES)
        # the thread and the finalizer hold no reference to self: an unclosed tunnel can still be
        # collected, and the finalizer then (or at interpreter exit) stops its process
        self._reader = threading.Thread(
            target=_drain, args=(process.stdout, self._output, program, secrets),
            name=f"tunnel-output-{process.pid}", daemon=True)
        self._reader.start()
        self._stop = weakref.finalize(self, _stop_group, process, self._reader, local_port)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def last_output(self) -> str:
        """Return the last line the command printed (passwords scrubbed), or ``(no output)``."""
        return self._output[-1] if self._output else "(no output)"

    def __repr__(self) -> str:
        state = "closed" if not self._stop.alive else f"pid {self.pid}"
        return f"Tunnel({self.program!r}, {LOCALHOST}:{self.local_port}, {state})"

    def healthy(self) -> bool:
        """Return True while the command runs and its local port accepts TCP connections."""
        return self.process.poll() is None and _accepts(self.local_port)

    def check(self) -> None:
        """Return if the tunnel is healthy; raise TunnelError saying how it died otherwise."""
        if self.healthy():
            return
        returncode = self.process.poll()
        if returncode is None:
            state = f"runs but 127.0.0.1:{self.local_port} refuses connections"
        else:
            self._reader.join(timeout=1)
            state = _exit_description(returncode)
        raise TunnelError(f"tunnel `{self.program}` is down ({state}; last output: "
                          f"{self.last_output}): {FIX}")

    def target_for(self, target: Target | str) -> Target:
        """Return ``target`` rewritten to the tunnel's local end (see the module docstring)."""
        return local_target(target, self.local_port)

    def close(self) -> None:
        """Stop the command and everything in its process group; calling it again does nothing."""
        if self._stop.alive:
            log.info("closing tunnel %s on %s:%s (pid %s)", self.program, LOCALHOST,
                     self.local_port, self.pid)
        self._stop()

    def __enter__(self) -> Tunnel:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def _wait_until_listening(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            returncode = self.process.poll()
            if returncode is not None:
                self._reader.join(timeout=1)  # its last words are what the message quotes
                raise TunnelError(
                    f"tunnel command `{self.program}` {_exit_description(returncode)} before "
                    f"{LOCALHOST}:{self.local_port} accepted connections: {self.last_output}: {FIX}")
            if _accepts(self.local_port):
                return
            if time.monotonic() >= deadline:
                raise TunnelError(
                    f"tunnel command `{self.program}` did not open {LOCALHOST}:{self.local_port} "
                    f"within {timeout:g}s (last output: {self.last_output}): {FIX}")
            time.sleep(POLL_INTERVAL)


def open_tunnel(settings: Settings, *, local_port: int | None = None) -> Tunnel:
    """Start the tunnel command and return it once its port accepts connections.

    Raises ConfigError for a malformed command or a pinned port already in use, TunnelError when
    the command is missing, exits, or does not open the port within proxy_start_timeout.
    """
    port = settings.proxy_local_port if local_port is None else local_port
    if not 0 <= port <= 65535:
        raise ConfigError(f"tunnel port {port} is not a TCP port: set MIGRATE_PROXY_LOCAL_PORT "
                          "to 1-65535, or 0 to pick a free one")
    if port == 0:
        port = free_port()
    else:
        _ensure_port_free(port)
    argv = tunnel_command(settings, port)
    program = Path(argv[0]).name
    try:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    except FileNotFoundError:
        raise TunnelError(f"tunnel command `{program}` was not found: {FIX} "
                          "(or set MIGRATE_PROXY_COMMAND)") from None
    except OSError as exc:
        raise TunnelError(f"tunnel command `{program}` cannot start: {exc.strerror}: {FIX}") from None
    tunnel = Tunnel(process, program, port, (settings.database_password(),))
    try:
        tunnel._wait_until_listening(settings.proxy_start_timeout)
    except BaseException:
        # a failed start, a Ctrl-C while waiting: no tunnel is left behind either way
        tunnel.close()
        raise
    log.info("tunnel %s open on %s:%s (pid %s)", program, LOCALHOST, port, process.pid)
    return tunnel


def _accepts(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def _ensure_port_free(port: int) -> None:
    # both tests: a bind alone misses a wildcard listener on macOS (SO_REUSEADDR semantics there)
    busy = _accepts(port)
    if not busy:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((LOCALHOST, port))
            except OSError:
                busy = True
    if busy:
        raise ConfigError(
            f"{LOCALHOST}:{port} is already in use (a `fly proxy` left running in another "
            "terminal?): stop what listens there, or set MIGRATE_PROXY_LOCAL_PORT to another "
            "port (0 picks a free one)")


def _exit_description(returncode: int) -> str:
    if returncode < 0:
        return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def _drain(stream: IO[bytes], output: deque[str], program: str,
           secrets: tuple[str | None, ...]) -> None:
    # runs until the command and every child holding the pipe have exited
    for raw in iter(stream.readline, b""):
        line = redact(raw.decode(errors="replace").strip(), *secrets)
        if line:
            output.append(line)
            log.debug("%s: %s", program, line)


def _stop_group(process: subprocess.Popen, reader: threading.Thread, local_port: int) -> None:
    # the command leads its own session and group: its pid is the group id
    _signal_group(process.pid, signal.SIGTERM)
    try:
        process.wait(CLOSE_GRACE)
    except subprocess.TimeoutExpired:
        log.warning("tunnel pid %s ignored SIGTERM for %gs: killing it", process.pid, CLOSE_GRACE)
    # also reaches children that outlived the leader (a wrapper script's `fly proxy`)
    _signal_group(process.pid, signal.SIGKILL)
    process.wait()
    # a child holding the port dies a moment after SIGKILL, not at once: return when the port is
    # free, so that a tunnel opened next on the same port does not find it taken
    deadline = time.monotonic() + PORT_RELEASE_WAIT
    while _accepts(local_port, timeout=0.1) and time.monotonic() < deadline:
        time.sleep(0.01)
    reader.join(timeout=1)
    if not reader.is_alive() and process.stdout is not None:
        process.stdout.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # the group is already empty
