"""Audio sources: microphone, file, ffmpeg, stdin and the synthetic demo, all feeding a ring.

Each configured source becomes one `Capture`. Its producer (a PortAudio callback or
a reader thread) writes float32 mono samples at the source's own rate into a
`SampleRing`; the worker thread calls `Capture.read`, which drains the ring,
replaces non-finite samples and resamples to the model rate. Producers never wait
for the worker, except the non-realtime file-like sources, which apply back-pressure
through `SampleRing.space` so that no sample is dropped.

User mistakes (no such device, unreadable file, ffmpeg missing) raise `CaptureError`
from `start()` with one line that says what to do; failures while running (a USB
microphone unplugged, a camera stream dropping) are logged and retried with
exponential backoff until the daemon stops.

One module per source kind: `base` (the `Capture` class and shared helpers), `mic`,
`file`, `ffmpeg`, `stdin`, `demo`, and `devices` (PortAudio device listing/resolution).
This package maps a source config's `kind` to its class (`make_capture`).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .base import (
    BACKOFF_MAX_S,
    BACKOFF_MIN_S,
    JOIN_TIMEOUT_S,
    REPORT_EVERY_S,
    RING_S,
    Capture,
    CaptureError,
)
from .demo import DemoCapture
from .devices import has_input_device, list_devices, resolve_input_device
from .ffmpeg import FfmpegCapture
from .file import FileCapture, iter_file_blocks
from .mic import MAX_VIRTUAL_CHANNELS, MicCapture
from .stdin import StdinCapture

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

__all__ = [
    "BACKOFF_MAX_S",
    "BACKOFF_MIN_S",
    "JOIN_TIMEOUT_S",
    "MAX_VIRTUAL_CHANNELS",
    "REPORT_EVERY_S",
    "RING_S",
    "Capture",
    "CaptureError",
    "DemoCapture",
    "FfmpegCapture",
    "FileCapture",
    "MicCapture",
    "StdinCapture",
    "has_input_device",
    "iter_file_blocks",
    "list_devices",
    "make_capture",
    "resolve_input_device",
]

_KINDS: dict[str, type[Capture]] = {
    "mic": MicCapture,
    "file": FileCapture,
    "ffmpeg": FfmpegCapture,
    "stdin": StdinCapture,
    "demo": DemoCapture,
}


def make_capture(cfg: SourceConfig, target_rate: int, stop: threading.Event) -> Capture:
    """Create the (unstarted) capture for a source config; CaptureError for an unknown kind."""
    kind = str(cfg.kind)
    cls = _KINDS.get(kind)
    if cls is None:
        raise CaptureError(f"source '{cfg.name}': unknown kind '{kind}' (use one of: {', '.join(_KINDS)})")
    return cls(cfg, target_rate, stop)
