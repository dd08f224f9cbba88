"""The proxy tunnel: real processes (a TCP forwarder in place of `fly proxy`), real PostgreSQL."""

from __future__ import annotations

import os
import shlex
import signal
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dbcore import proxy
from dbcore.connection import Env, Target, connect
from dbcore.errors import ConfigError, DatabaseUnavailable, TunnelError
from dbcore.ports import free_port
from dbcore.proxy import local_target, open_tunnel, tunnel_command
from dbcore.settings import Settings

FORWARDER = Path(__file__).resolve().parent.parent / "tcp_forwarder.py"
PYTHON = shlex.quote(sys.executable)
PROGRAM = Path(sys.executable).name


def python_command(code: str) -> str:
    """Return a MIGRATE_PROXY_COMMAND that runs ``code`` in this Python."""
    return f"{PYTHON} -c {shlex.quote(code)}"


def gone(pid: int) -> bool:
    """Return True when no process ``pid`` exists (a zombie counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def live_group_members(pgid: int) -> list[int]:
    """Return the pids of the live processes of group ``pgid`` (zombies awaiting init excluded)."""
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                members.append(int(entry.name))
    return members


def test_query_through_the_tunnel(forwarder_settings, db_url):
    with open_tunnel(forwarder_settings) as tunnel:
        assert tunnel.healthy()
        target = tunnel.target_for(Target(Env.PROXY, db_url))
        assert urlsplit(target.url).port == tunnel.local_port != urlsplit(db_url).port
        db = connect(target)
        try:
            assert db.execute_sql("select current_database()").fetchone()[0] == target.dbname
        finally:
            db.close()
    assert not tunnel.healthy()


def test_target_for_rewrites_host_and_port_only():
    url = "postgres://app:s3cr%40t@my-db.flycast:5432/appdb?sslmode=disable&host=/tmp&port=5"
    target = local_target(url, 15999)
    assert target.env is Env.PROXY
    assert target.url == "postgres://app:s3cr%40t@127.0.0.1:15999/appdb?sslmode=disable"
    assert target.password == "s3cr@t"
    production = Target(Env.PRODUCTION, "postgresql://u@10.0.0.1/x")
    assert local_target(production, 1).url == "postgresql://u@127.0.0.1:1/x"


def test_command_that_exits_at_once_names_itself_and_its_output(tmp_path):
    settings = Settings(
        proxy_command=python_command(
            "import sys; print('Error: no access token available. Please login with flyctl auth login'); sys.exit(1)"),
        proxy_local_port=0, proxy_start_timeout=120, local_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(TunnelError) as info:
        open_tunnel(settings)
    message = str(info.value)
    assert time.monotonic() - started < settings.proxy_start_timeout  # did not sit it out
    assert f"`{PROGRAM}` exited with code 1" in message
    assert "no access token available" in message and "fly auth login" in message
    assert "\n" not in message and info.value.retryable


def test_missing_program_is_a_tunnel_error(tmp_path):
    settings = Settings(proxy_command="flyctl-not-installed-here proxy {local_port}:5432",
                        proxy_local_port=0, local_dir=tmp_path)
    with pytest.raises(TunnelError, match="`flyctl-not-installed-here` was not found"):
        open_tunnel(settings)


def test_command_that_never_opens_the_port_times_out(tmp_path):
    marker = f"never-listens-{uuid.uuid4().hex}"
    # 2 s: long enough for a new interpreter to print its line on a loaded machine
    settings = Settings(proxy_command=python_command(f"import time; print('waiting'); time.sleep(60)  # {marker}"),
                        proxy_local_port=0, proxy_start_timeout=2, local_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(TunnelError) as info:
        open_tunnel(settings)
    assert time.monotonic() - started >= 2  # it waited its start timeout, then gave up
    assert f"`{PROGRAM}` did not open 127.0.0.1:" in str(info.value)
    assert "within 2s (last output: waiting)" in str(info.value)
    # the command it gave up on was stopped, not left sleeping
    assert _pids_running(marker) == []


def test_output_never_shows_the_database_password(tmp_path):
    settings = Settings(
        database_url="postgres://app:hunter2-secret@my-db.flycast:5432/app",
        proxy_command=python_command("print('bad url postgres://app:hunter2-secret@x'); raise SystemExit(3)"),
        proxy_local_port=0, local_dir=tmp_path)
    with pytest.raises(TunnelError) as info:
        open_tunnel(settings)
    assert "hunter2-secret" not in str(info.value) and "app:***@x" in str(info.value)


def test_killed_forwarder_is_unhealthy_and_connections_fail(forwarder_settings, db_url):
    with open_tunnel(forwarder_settings) as tunnel:
        target = tunnel.target_for(db_url)
        connect(target).close()
        os.kill(tunnel.pid, signal.SIGKILL)
        tunnel.process.wait(5)
        assert not tunnel.healthy()
        with pytest.raises(TunnelError, match=r"is down \(was killed by signal 9"):
            tunnel.check()
        with pytest.raises(DatabaseUnavailable, match="127.0.0.1"):
            connect(target)
    tunnel.close()  # closing a dead, closed tunnel again is harmless


def test_close_leaves_no_process_behind(forwarder_settings):
    # a wrapper shell whose child does the forwarding, as a script around `fly proxy` would
    inner = forwarder_settings.proxy_command
    wrapped = forwarder_settings.model_copy(update={"proxy_command": f"sh -c {shlex.quote(inner + ' & wait')}"})
    tunnel = open_tunnel(wrapped)
    pgid = tunnel.pid
    assert len(live_group_members(pgid)) >= 2
    tunnel.close()
    assert gone(pgid) and live_group_members(pgid) == []
    assert not tunnel.healthy() and not proxy._accepts(tunnel.local_port)
    tunnel.close()
    assert "closed" in repr(tunnel)


def test_close_kills_a_command_that_ignores_sigterm(tmp_path, monkeypatch):
    monkeypatch.setattr(proxy, "CLOSE_GRACE", 0.3)
    code = ("import signal, socket, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); time.sleep(60)")
    settings = Settings(proxy_command=python_command(code) + " {local_port}", proxy_local_port=0,
                        local_dir=tmp_path)
    tunnel = open_tunnel(settings)
    tunnel.close()
    # killed after the grace, not waited for: its sleep would have ended it with code 0
    assert gone(tunnel.pid) and tunnel.process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("interruption", [RuntimeError, KeyboardInterrupt])
def test_context_manager_closes_on_exception(forwarder_settings, interruption):
    with pytest.raises(interruption):
        with open_tunnel(forwarder_settings) as tunnel:
            pid = tunnel.pid
            raise interruption()
    assert gone(pid) and not tunnel.healthy()


def test_pinned_port_in_use_is_refused(forwarder_settings):
    with open_tunnel(forwarder_settings) as first:
        with pytest.raises(ConfigError, match=rf"127.0.0.1:{first.local_port} is already in use"):
            open_tunnel(forwarder_settings, local_port=first.local_port)
        assert first.healthy()  # the refused second start did not disturb the first


def test_pinned_port_is_used(forwarder_settings):
    port = free_port()
    with open_tunnel(forwarder_settings, local_port=port) as tunnel:
        assert tunnel.local_port == port and tunnel.healthy()


def test_command_template(tmp_path):
    settings = Settings(proxy_app="my app-db", local_dir=tmp_path)
    assert tunnel_command(settings, 15432) == ["fly", "proxy", "15432:5432", "--app", "my app-db"]
    with pytest.raises(ConfigError, match="MIGRATE_PROXY_APP is not set"):
        tunnel_command(Settings(local_dir=tmp_path), 15432)
    with pytest.raises(ConfigError, match=r"unknown placeholder\(s\) \['port'\]"):
        tunnel_command(Settings(proxy_command="fly proxy {port}", local_dir=tmp_path), 1)
    with pytest.raises(ConfigError, match="cannot be parsed"):
        tunnel_command(Settings(proxy_command="fly 'proxy", local_dir=tmp_path), 1)


def _pids_running(fragment: str) -> list[int]:
    """Return the pids of processes whose command line contains ``fragment``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if fragment in cmdline:
                pids.append(int(entry.name))
    return pids
