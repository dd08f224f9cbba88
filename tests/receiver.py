"""A real HTTP receiver of notifications on 127.0.0.1: what a Slack incoming webhook would get."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """Collects the JSON bodies POSTed to it; answers ``status`` after ``delay`` seconds."""

    def __init__(self, status: int = 200, delay: float = 0.0):
        self.status, self.delay = status, delay
        self.bodies: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the name http.server calls
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                time.sleep(receiver.delay)
                receiver.bodies.append(body)
                self.send_response(receiver.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads, self.server.block_on_close = True, False  # close() never waits on a slow answer
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/T000/B000/secret-token"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def texts(self) -> list[str]:
        return [b["text"] for b in self.bodies if isinstance(b, dict) and "text" in b]

    def wait_for(self, needle: str, timeout: float = 30.0) -> str:
        """Return the first text containing ``needle``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for text in self.texts:
                if needle in text:
                    return text
            time.sleep(0.2)
        raise AssertionError(f"no notification with {needle!r}; got {self.texts}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
