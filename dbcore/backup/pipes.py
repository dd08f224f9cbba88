"""A writer thread between a producer of compressed chunks and a file or a pipe."""

from __future__ import annotations

import queue
import threading

import zstandard

#: chunks waiting for the writing thread (downloaded ones are about 1 MiB each)
FETCH_AHEAD = 8


class BackgroundWriter:
    """Decompress (if asked) and write chunks in a thread, so that the download goes on meanwhile.

    At most FETCH_AHEAD chunks wait in memory. An error of the thread (ZstdError, OSError) is
    raised by the next ``write`` or on leaving the ``with`` block.
    """

    def __init__(self, out, decompress: bool):
        self._sink = (zstandard.ZstdDecompressor().stream_writer(out, closefd=False)
                      if decompress else out)
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=FETCH_AHEAD)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="backup-writer", daemon=True)

    def __enter__(self) -> BackgroundWriter:
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            while (chunk := self._queue.get()) is not None:
                self._sink.write(chunk)
            self._sink.flush()
        except BaseException as exc:  # handed to the downloading thread
            self._error = exc
            while self._queue.get() is not None:  # never leave the producer blocked
                pass

    def write(self, chunk: bytes) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(chunk)

    def __exit__(self, exc_type, exc, tb) -> None:
        self._queue.put(None)
        self._thread.join()
        if exc_type is None and self._error is not None:
            raise self._error
