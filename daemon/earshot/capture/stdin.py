"""Stdin source: raw s16le mono 16 kHz samples piped into the daemon's standard input."""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
from typing import IO, TYPE_CHECKING

from .base import Capture, CaptureError, _S16Decoder

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

_LOGGER = logging.getLogger(__name__)


class StdinCapture(Capture):
    """Raw s16le mono samples at 16 kHz on standard input (e.g. `arecord -f S16_LE -r 16000 | earshot run`)."""

    RATE = 16000
    """Sample rate of the stdin stream (Hz)."""

    def __init__(
        self, cfg: SourceConfig, target_rate: int, stop: threading.Event, stream: IO[bytes] | None = None
    ) -> None:
        """See `Capture`; `stream` replaces `sys.stdin.buffer` (tests, embedding)."""
        super().__init__(cfg, target_rate, stop)
        self._stream = stream

    def start(self) -> None:
        """Start the reader thread."""
        self._setup_rate(self.RATE)
        if self._stream is None:
            if sys.stdin is None or getattr(sys.stdin, "buffer", None) is None or sys.stdin.closed:
                raise CaptureError(f"source '{self.name}' (kind = \"stdin\") reads standard input, but standard "
                                   "input is closed; pipe audio in (ffmpeg ... -f s16le - | earshot run) or use "
                                   "another kind of source")
            self._stream = sys.stdin.buffer
        _LOGGER.info("source %s: reading s16le mono %d Hz from standard input", self.name, self.RATE)
        self._spawn(self._run, "stdin")

    def _run(self) -> None:
        """Reader thread: read until EOF (with back-pressure), then mark the source done."""
        stream = self._stream
        assert stream is not None
        decoder = _S16Decoder()
        try:
            fd: int | None = stream.fileno()
        except (OSError, AttributeError, ValueError):  # an in-memory stream has no descriptor
            fd = None
        try:
            while not self._stopping():
                if fd is not None:
                    # select() with a timeout keeps stop() responsive while stdin is idle.
                    ready, _, _ = select.select([fd], [], [], 0.2)
                    if not ready:
                        continue
                    chunk = os.read(fd, 8192)
                else:
                    chunk = stream.read(8192)
                if not chunk:
                    break
                x = decoder.decode(chunk)
                if x.size and not self._emit(x, None):
                    break
        finally:
            self.source_done.set()
            self.ring.notify()
