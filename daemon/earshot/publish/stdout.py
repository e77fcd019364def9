"""Stdout publisher: one JSON line per event, for debugging, pipes and black-box tests."""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

from earshot.events import Event
from earshot.publish import payload_of

log = logging.getLogger(__name__)


class StdoutPublisher:
    """Writes each event's JSON as one line and flushes it, so a reader sees it at once.

    Thread-safe: a lock keeps lines from different workers from interleaving.
    """

    name = "stdout"

    def __init__(self, stream: TextIO | None = None) -> None:
        # None means "sys.stdout at write time", so redirections made later still apply.
        self._stream = stream
        self._lock = threading.Lock()
        self.published = 0
        self.dropped = 0

    def publish(self, event: Event, payload: bytes | None = None) -> None:
        """Write the event as one flushed JSON line; a closed or broken stream is counted, not raised."""
        line = payload_of(event, payload).decode("utf-8") + "\n"
        with self._lock:
            stream = self._stream if self._stream is not None else sys.stdout
            try:
                stream.write(line)
                stream.flush()
            except (OSError, ValueError) as e:  # BrokenPipeError, or "I/O operation on closed file"
                if self.dropped == 0:
                    log.warning("cannot write events to stdout (%s); further failures are only counted", e)
                self.dropped += 1
                return
            self.published += 1

    def stats(self) -> dict[str, Any]:
        """Counters: `published`, `dropped`."""
        with self._lock:
            return {"published": self.published, "dropped": self.dropped}

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush the stream (lines are already flushed one by one); never raises."""
        with self._lock:
            stream = self._stream if self._stream is not None else sys.stdout
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
