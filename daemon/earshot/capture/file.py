"""File source: an audio file libsndfile reads, played into the ring, and blockwise reading for offline `detect`."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ..resample import StreamingResampler
from .base import Capture, CaptureError, _Pacer

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

_LOGGER = logging.getLogger(__name__)

_SF_ERRORS: tuple[type[BaseException], ...] = (sf.LibsndfileError, RuntimeError, OSError, ValueError)


def _sf_reason(exc: BaseException) -> str:
    """The human part of a soundfile/libsndfile error ("Format not recognised.")."""
    reason = getattr(exc, "error_string", None) or str(exc)
    return " ".join(str(reason).split()) or type(exc).__name__


class FileCapture(Capture):
    """An audio file (anything libsndfile reads: wav, flac, ogg, ...) played at real time or as fast as consumed."""

    def __init__(self, cfg: SourceConfig, target_rate: int, stop: threading.Event) -> None:
        """See `Capture`."""
        super().__init__(cfg, target_rate, stop)
        self._file: sf.SoundFile | None = None

    def start(self) -> None:
        """Open the file (CaptureError if it cannot be read) and start the reader thread."""
        path = self.cfg.path
        if not path:
            raise CaptureError(f"source '{self.name}' has kind = \"file\" but no path: set `path`")
        try:
            self._file = sf.SoundFile(str(path))
        except _SF_ERRORS as exc:
            raise CaptureError(f"cannot read {path}: {_sf_reason(exc)}") from exc
        self._setup_rate(self._file.samplerate)
        _LOGGER.info(
            "source %s: playing %s (%d Hz, %d channel(s), %.1f s)%s",
            self.name,
            path,
            self._file.samplerate,
            self._file.channels,
            self._file.frames / self._file.samplerate,
            " at real time" if self.cfg.realtime else "",
        )
        self._spawn(self._run, "file-reader")

    def _run(self) -> None:
        """Reader thread: read blocks, downmix, emit; loop or finish at the end."""
        f = self._file
        assert f is not None
        block = max(1, int(round(f.samplerate * float(self.cfg.block_ms) / 1000.0)))
        pace = _Pacer(f.samplerate) if self.cfg.realtime else None
        channel = self.cfg.channel
        if channel is not None and not 0 <= int(channel) < f.channels:
            _LOGGER.warning("source %s: file has %d channel(s); ignoring channel %s", self.name, f.channels, channel)
            channel = None
        # libsndfile is asked for about half a second at a time and the blocks are cut from that:
        # one read call per block costs more than the block's samples (50 calls a second per source).
        per_read = block * max(1, round(0.5 * f.samplerate / block))
        try:
            while not self._stopping():
                try:
                    x = f.read(per_read, dtype="float32", always_2d=True)
                except _SF_ERRORS as exc:
                    _LOGGER.error(
                        "source %s: %s is corrupt after %.2f s (%s); keeping what was read",
                        self.name,
                        self.cfg.path,
                        f.tell() / f.samplerate if not f.closed else 0.0,
                        _sf_reason(exc),
                    )
                    break
                if x.shape[0] == 0:
                    if self.cfg.loop and f.frames > 0:
                        f.seek(0)
                        continue
                    break
                mono = x[:, int(channel)] if channel is not None else x.mean(axis=1, dtype=np.float32)
                mono = np.ascontiguousarray(mono, dtype=np.float32)
                if not all(self._emit(mono[i:i + block], pace) for i in range(0, len(mono), block)):
                    break
        finally:
            f.close()
            self.source_done.set()
            self.ring.notify()



def iter_file_blocks(path: str | os.PathLike[str], target_rate: int, block_s: float = 1.0) -> Iterator[np.ndarray]:
    """Yield a file's audio as float32 mono blocks of about `block_s` seconds at `target_rate` (offline `detect`).

    Reads anything libsndfile reads, downmixes, zeroes NaN/inf samples and resamples.
    An unreadable file raises `CaptureError("cannot read FILE: reason")` before the
    first block; a file corrupt in the middle yields everything decoded before the
    corruption and then raises `CaptureError` (so the caller can report partial results).
    """
    try:
        f = sf.SoundFile(str(path))
    except _SF_ERRORS as exc:
        raise CaptureError(f"cannot read {path}: {_sf_reason(exc)}") from exc
    with f:
        resampler = StreamingResampler(f.samplerate, target_rate)
        block = max(1, int(round(block_s * f.samplerate)))
        failure: str | None = None
        while True:
            try:
                x = f.read(block, dtype="float32", always_2d=True)
            except _SF_ERRORS as exc:
                failure = f"cannot read {path}: corrupt after {f.tell() / f.samplerate:.2f} s ({_sf_reason(exc)})"
                break
            if x.shape[0] == 0:
                break
            mono = x.mean(axis=1, dtype=np.float32)
            mono[~np.isfinite(mono)] = 0.0
            y = resampler.process(mono)
            if y.size:
                yield y
        tail = resampler.flush()
        if tail.size:
            yield tail
        if failure is not None:
            raise CaptureError(failure)
