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
from ..config import readable_file_problem
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
        if why := readable_file_problem(str(path)):
            raise CaptureError(f"cannot read {why}")
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
        # A looped short file is decoded once and replayed from memory: decoding again on every pass
        # costs CPU and repeats the decoder's own stderr messages (libmpg123 prints a few per pass of
        # some mp3 files, thousands a minute for a short clip looped as fast as possible).
        cache: list[np.ndarray] | None = [] if self.cfg.loop and f.frames <= LOOP_CACHE_S * f.samplerate else None
        try:
            while not self._stopping():
                try:
                    x = f.read(block, dtype="float32", always_2d=True)
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
                    if cache:
                        self._replay(cache, pace)
                        break
                    if self.cfg.loop and f.frames > 0:
                        f.seek(0)
                        continue
                    break
                mono = x[:, int(channel)] if channel is not None else x.mean(axis=1, dtype=np.float32)
                mono = np.ascontiguousarray(mono, dtype=np.float32)
                if cache is not None:
                    cache.append(mono)
                if not self._emit(mono, pace):
                    break
        finally:
            f.close()
            self.source_done.set()
            self.ring.notify()

    def _replay(self, cache: list[np.ndarray], pace: _Pacer | None) -> None:
        """Loop the decoded blocks of a short file until stop."""
        while not self._stopping():
            for mono in cache:
                if not self._emit(mono, pace):
                    return



LOOP_CACHE_S = 600.0
"""A looped file up to this long (s) is decoded once and replayed from memory (at most about 115 MB at 48 kHz)."""


def iter_file_blocks(path: str | os.PathLike[str], target_rate: int, block_s: float = 1.0) -> Iterator[np.ndarray]:
    """Yield a file's audio as float32 mono blocks of about `block_s` seconds at `target_rate` (offline `detect`).

    Reads anything libsndfile reads, downmixes, zeroes NaN/inf samples and resamples.
    An unreadable file raises `CaptureError("cannot read FILE: reason")` before the
    first block; a file corrupt in the middle yields everything decoded before the
    corruption and then raises `CaptureError` (so the caller can report partial results).
    """
    if why := readable_file_problem(str(path)):
        raise CaptureError(f"cannot read {why}")
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
