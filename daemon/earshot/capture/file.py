"""File source: an audio file libsndfile reads, played into the ring, and blockwise reading for offline `detect`."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import soundfile as sf

from ..resample import StreamingResampler
from ..config import readable_file_problem
from .base import JOIN_TIMEOUT_S, Capture, CaptureError, _Pacer

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
        if self.cfg.realtime:
            _PLAYER.add(self)
        else:
            self._spawn(self._run, "file-reader")

    def stop(self) -> None:
        """Stop playing and close the file (bounded)."""
        super().stop()
        if self.cfg.realtime and self._file is not None:
            _PLAYER.wake()
            if not self.source_done.wait(JOIN_TIMEOUT_S):
                _LOGGER.warning("source %s: the file player did not let go within %.1f s", self.name, JOIN_TIMEOUT_S)

    # -- real time: one step of the shared player ------------------------------------------

    def _play_setup(self, now: float) -> None:
        f = self._file
        assert f is not None
        self._block = self.cfg.block_samples(f.samplerate)
        block_s = self._block / f.samplerate
        # Start on a grid shared by every source with this block length, so that the player
        # wakes once per block for all of them instead of once per source.
        self._t0 = math.floor(now / block_s) * block_s
        self._emitted = 0
        self._next_due = now  # when `_play` has something to write next
        self._buf = np.zeros(0, dtype=np.float32)
        self._pos = 0
        # A looped short file is decoded once and replayed from memory (see `_run`).
        self._cache: list[np.ndarray] | None = [] if _cache_loop(self.cfg, f) else None
        self._cached = -1  # while replaying: index of the next chunk of `_cache`; -1 while still decoding
        self._channel = self.cfg.channel
        if self._channel is not None and not 0 <= int(self._channel) < f.channels:
            _LOGGER.warning("source %s: file has %d channel(s); ignoring channel %s", self.name, f.channels,
                            self._channel)
            self._channel = None

    def _play(self, now: float) -> float | None:
        """Write every block whose time has come; return when the next one is due, or None at the end."""
        if now < self._next_due and not self._stopping():
            return self._next_due  # woken early (another source's block, a new source): nothing to do
        f = self._file
        assert f is not None
        rate = f.samplerate
        while not self._stopping():
            if self._pos >= len(self._buf):
                x = self._read_chunk(f)
                if x is None:
                    return None
                self._buf, self._pos = x, 0
                continue
            n = min(self._block, len(self._buf) - self._pos)
            due = self._t0 + (self._emitted + n) / rate  # a block goes out when it would have been recorded
            if due > now:
                self._next_due = due
                return due
            if now - due > 1.0:  # e.g. the machine was suspended: do not burst to catch up
                self._t0 = now - self._emitted / rate
            self.ring.write(self._buf[self._pos:self._pos + n])
            self._pos += n
            self._emitted += n
        return None

    def _read_chunk(self, f: sf.SoundFile) -> np.ndarray | None:
        """About half a second of mono audio from the file; None at the end (or on corruption)."""
        if self._cache and self._cached >= 0:  # replaying a looped short file
            x = self._cache[self._cached]
            self._cached = (self._cached + 1) % len(self._cache)
            return x
        per_read = self._block * max(1, round(0.5 * f.samplerate / self._block))
        for _ in range(2):  # at the end of a looping file: once more from the start
            try:
                x = f.read(per_read, dtype="float32", always_2d=True)
            except _SF_ERRORS as exc:
                _LOGGER.error("source %s: %s is corrupt after %.2f s (%s); keeping what was read", self.name,
                              self.cfg.path, f.tell() / f.samplerate if not f.closed else 0.0, _sf_reason(exc))
                return None
            if x.shape[0]:
                mono = x[:, int(self._channel)] if self._channel is not None else x.mean(axis=1, dtype=np.float32)
                mono = np.ascontiguousarray(mono, dtype=np.float32)
                if self._cache is not None:
                    self._cache.append(mono)
                return mono
            if self._cache:  # the whole file is decoded: replay it from memory from now on
                self._cached = 1 % len(self._cache)
                return self._cache[0]
            if not (self.cfg.loop and f.frames > 0):
                return None
            f.seek(0)
        return None

    def _play_end(self) -> None:
        if self._file is not None:
            self._file.close()
        self.source_done.set()
        self.ring.notify()

    def _run(self) -> None:
        """Reader thread: read blocks, downmix, emit; loop or finish at the end."""
        f = self._file
        assert f is not None
        block = self.cfg.block_samples(f.samplerate)
        pace = _Pacer(f.samplerate) if self.cfg.realtime else None
        channel = self.cfg.channel
        if channel is not None and not 0 <= int(channel) < f.channels:
            _LOGGER.warning("source %s: file has %d channel(s); ignoring channel %s", self.name, f.channels, channel)
            channel = None
        # A looped short file is decoded once and replayed from memory: decoding again on every pass
        # costs CPU and repeats the decoder's own stderr messages (libmpg123 prints a few per pass of
        # some mp3 files, thousands a minute for a short clip looped as fast as possible).
        cache: list[np.ndarray] | None = [] if _cache_loop(self.cfg, f) else None
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
                    if cache:
                        self._replay(cache, block, pace)
                        break
                    if self.cfg.loop and f.frames > 0:
                        f.seek(0)
                        continue
                    break
                mono = x[:, int(channel)] if channel is not None else x.mean(axis=1, dtype=np.float32)
                mono = np.ascontiguousarray(mono, dtype=np.float32)
                if cache is not None:
                    cache.append(mono)
                if not all(self._emit(mono[i:i + block], pace) for i in range(0, len(mono), block)):
                    break
        finally:
            f.close()
            self.source_done.set()
            self.ring.notify()

    def _replay(self, cache: list[np.ndarray], block: int, pace: _Pacer | None) -> None:
        """Loop the decoded audio of a short file until stop."""
        while not self._stopping():
            for mono in cache:
                if not all(self._emit(mono[i:i + block], pace) for i in range(0, len(mono), block)):
                    return



LOOP_CACHE_S = 600.0
"""A looped file up to this long (s) is decoded once and replayed from memory (at most about 115 MB at 48 kHz)."""


def _cache_loop(cfg: SourceConfig, f: sf.SoundFile) -> bool:
    """Whether the file is looped and short enough to be decoded once and replayed from memory."""
    return bool(cfg.loop) and 0 < f.frames <= LOOP_CACHE_S * f.samplerate


class _Player:
    """The one thread that plays every real-time file source of this process.

    A thread per source would wake 50 times a second each (20 ms blocks); with hundreds of
    sources those wake-ups, each taking the interpreter lock, cost more than the detection.
    The player wakes once per block for all sources (their start times share a grid) and
    writes each source's block into its ring, as a thread per source would. A source that
    fails is marked failed alone (`Capture.error`), like a crashed reader thread.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # Replaced, never changed in place, under the lock: the player reads it once per wake without
        # taking the lock (50 times a second).
        self._sources: tuple[FileCapture, ...] = ()
        self._thread: threading.Thread | None = None
        self._wake = threading.Event()

    def add(self, cap: FileCapture) -> None:
        cap._play_setup(time.monotonic())
        with self._lock:
            self._sources = (*self._sources, cap)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="earshot-file-player", daemon=True)
                self._thread.start()
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            sources = self._sources
            if not sources:
                with self._lock:
                    if not self._sources:
                        self._thread = None
                        return
                    continue
            now = time.monotonic()
            next_due = now + 0.1  # stop requests are noticed within this
            for cap in sources:
                try:
                    due = cap._play(now)
                except Exception as exc:  # a bug must not pass silently, nor stop the other sources
                    _LOGGER.exception("source %s: the file player failed on it", cap.name)
                    cap.error = f"file player failed: {exc}"
                    due = None
                if due is None:
                    with self._lock:
                        self._sources = tuple(c for c in self._sources if c is not cap)
                    cap._play_end()
                else:
                    next_due = min(next_due, due)
            delay = next_due - time.monotonic()
            if delay > 0 and not self._wake.is_set():
                # A plain sleep (this runs once per block): an Event wait with a timeout
                # allocates a lock each time. New sources and stops are seen within 0.1 s.
                time.sleep(delay)
            if self._wake.is_set():  # clearing takes the Event's lock: only when there is something to clear
                self._wake.clear()


_PLAYER = _Player()


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
