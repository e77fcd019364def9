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
"""

from __future__ import annotations

import collections
import logging
import os
import select
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import soundfile as sf

from . import synth
from .resample import StreamingResampler
from .ring import SampleRing

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from .config import SourceConfig

_LOGGER = logging.getLogger(__name__)

RING_S = 10.0
"""Seconds of audio (at the source rate) the ring holds before the worker loses samples."""
JOIN_TIMEOUT_S = 3.0
"""Longest `stop()` waits for each producer thread."""
BACKOFF_MIN_S = 1.0
"""First retry delay after a live source failed (s); doubles on every failure."""
BACKOFF_MAX_S = 30.0
"""Longest retry delay (s)."""
REPORT_EVERY_S = 10.0
"""Least time between two warnings about status flags or lost samples of one source (s)."""
MAX_VIRTUAL_CHANNELS = 8
"""Devices advertising more input channels than this (ALSA `pulse`/`default`) are virtual: open them in stereo."""

_SF_ERRORS: tuple[type[BaseException], ...] = (sf.LibsndfileError, RuntimeError, OSError, ValueError)


class CaptureError(Exception):
    """A source cannot start because of something the user must fix; `str()` is one line saying what."""


class _Flag(threading.Event):
    """A `threading.Event` that is also truthy when set, so `if cap.finished:` reads naturally."""

    def __bool__(self) -> bool:
        return self.is_set()


def _sf_reason(exc: BaseException) -> str:
    """The human part of a soundfile/libsndfile error ("Format not recognised.")."""
    reason = getattr(exc, "error_string", None) or str(exc)
    return " ".join(str(reason).split()) or type(exc).__name__


def _bounded_call(fn: Callable[[], Any], timeout_s: float, what: str) -> None:
    """Run `fn` in a helper thread and give up waiting after `timeout_s` (a dead driver can hang a close)."""

    def run() -> None:
        try:
            fn()
        except Exception:  # the stream is being thrown away; the reason is only informative
            _LOGGER.debug("%s failed", what, exc_info=True)

    t = threading.Thread(target=run, name=f"earshot-{what}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        _LOGGER.warning("%s did not finish within %.1f s; abandoning it", what, timeout_s)


# -- base ----------------------------------------------------------------------------


class Capture:
    """One audio source: a producer filling `ring`, and `read()` for the worker thread.

    Lifecycle: `start()` (raises `CaptureError` on user errors), then the worker calls
    `read(timeout_s)` in a loop until `finished` (finite sources) or the daemon stops,
    then `stop()` (bounded joins). `stop` may also be requested through the shared
    `stop` event passed at construction.
    """

    def __init__(self, cfg: SourceConfig, target_rate: int, stop: threading.Event) -> None:
        """Prepare (but do not start) a source described by `cfg`, delivering `target_rate` Hz."""
        self.cfg = cfg
        """The source's configuration."""
        self.target_rate = int(target_rate)
        """Rate of the samples returned by `read` (Hz)."""
        self.samplerate: int = self.target_rate
        """Rate of the samples in `ring` (Hz); known after `start()`."""
        self.ring = SampleRing(max(1, int(RING_S * self.target_rate)))
        """Producer -> worker buffer (replaced in `start()` once the source rate is known)."""
        self.finished = _Flag()
        """Set (and truthy) once a finite source has ended and `read` has returned all of it."""
        self.source_done = threading.Event()
        """Set by the producer when a finite source has no more samples (some may still be in the ring)."""
        self.error: str | None = None
        """Why the source failed for good, or None."""
        self.status_flags = 0
        """Blocks the driver flagged (input overflow and the like); written by the producer only."""
        self.nonfinite_samples = 0
        """NaN/inf samples replaced by 0 in `read`."""
        self._stop = stop
        self._halt = threading.Event()  # this source only: set by stop()
        self._threads: list[threading.Thread] = []
        self._resampler = StreamingResampler(self.target_rate, self.target_rate)
        self._reported_flags = 0
        self._reported_lost = 0
        self._last_report = 0.0

    @property
    def name(self) -> str:
        """The source's configured name (used in events and logs)."""
        return str(self.cfg.name)

    @property
    def lost_samples(self) -> int:
        """Samples the producer overwrote before the worker read them (at the source rate)."""
        return self.ring.lost_samples

    @property
    def overruns(self) -> int:
        """Times the worker found the producer had lapped it."""
        return self.ring.overruns

    def _stopping(self) -> bool:
        """Whether this source or the whole daemon was asked to stop."""
        return self._halt.is_set() or self._stop.is_set()

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; return True when stopping."""
        deadline = time.monotonic() + seconds
        while not self._stopping():
            left = deadline - time.monotonic()
            if left <= 0:
                break
            # Short slices so that the shared daemon stop event is noticed promptly too.
            self._halt.wait(min(0.1, left))
        return self._stopping()

    def _setup_rate(self, rate: int) -> None:
        """Size the ring and the resampler for a source delivering `rate` Hz."""
        self.samplerate = int(rate)
        self.ring = SampleRing(max(1, int(RING_S * self.samplerate)))
        self._resampler = StreamingResampler(self.samplerate, self.target_rate)

    def _spawn(self, target: Callable[[], None], what: str) -> None:
        """Start a daemon producer thread that marks the source failed if it crashes."""

        def run() -> None:
            try:
                target()
            except Exception as exc:  # a producer bug must not pass silently: record it for the worker
                _LOGGER.exception("source %s: %s thread crashed", self.name, what)
                self.error = f"{what} thread crashed: {exc}"
                self.source_done.set()
                self.ring.notify()

        t = threading.Thread(target=run, name=f"earshot-{self.name}-{what}", daemon=True)
        self._threads.append(t)
        t.start()

    def start(self) -> None:
        """Open the source and start producing; raises `CaptureError` on user errors."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop producing and join the producer threads (bounded)."""
        self._halt.set()
        self.ring.notify()
        for t in self._threads:
            t.join(JOIN_TIMEOUT_S)
            if t.is_alive():
                _LOGGER.warning("source %s: thread %s did not stop within %.1f s", self.name, t.name, JOIN_TIMEOUT_S)
        self._threads = [t for t in self._threads if t.is_alive()]

    def read(self, timeout_s: float) -> np.ndarray:
        """Worker side: wait up to `timeout_s` for audio; return float32 mono at `target_rate` (maybe empty)."""
        done = self.source_done.is_set()  # checked before draining: every write precedes it
        if not done and self.ring.available() == 0:
            self.ring.wait(timeout_s)
            done = self.source_done.is_set()
        x = self.ring.read()
        if x.size:
            bad = ~np.isfinite(x)
            if bad.any():
                count = int(np.count_nonzero(bad))
                if self.nonfinite_samples == 0:
                    _LOGGER.warning("source %s: replacing NaN/inf samples with 0 (%d so far)", self.name, count)
                self.nonfinite_samples += count
                x[bad] = 0.0
        y = self._resampler.process(x)
        if done and self.ring.available() == 0 and not self.finished.is_set():
            tail = self._resampler.flush()
            if tail.size:
                y = np.concatenate((y, tail))
            self.finished.set()
        self._report()
        return y

    def _report(self) -> None:
        """Log (rate-limited) driver status flags and lost samples accumulated since the last report."""
        flags, lost = self.status_flags, self.ring.lost_samples
        if flags == self._reported_flags and lost == self._reported_lost:
            return
        now = time.monotonic()
        if now - self._last_report < REPORT_EVERY_S:
            return
        if flags > self._reported_flags:
            _LOGGER.warning(
                "source %s: the audio driver flagged %d more blocks (input overflow?), %d in total",
                self.name,
                flags - self._reported_flags,
                flags,
            )
        if lost > self._reported_lost:
            _LOGGER.warning(
                "source %s: %d samples (%.2f s) lost because processing fell behind",
                self.name,
                lost - self._reported_lost,
                (lost - self._reported_lost) / self.samplerate,
            )
        self._reported_flags, self._reported_lost, self._last_report = flags, lost, now

    # -- helpers for thread-driven sources --------------------------------------------

    def _emit(self, block: np.ndarray, pace: _Pacer | None) -> bool:
        """Write a block paced at real time (`pace`) or with back-pressure; False when stopping."""
        if pace is not None:
            if self._sleep(pace.delay_for(block.shape[0])):
                return False
            self.ring.write(block)
            return True
        # Back-pressure: never overrun the worker, wait for room instead.
        need = min(block.shape[0], self.ring.capacity)
        while self.ring.space() < need:
            if self._stopping():
                return False
            self._halt.wait(0.005)
        self.ring.write(block)
        return not self._stopping()


class _Pacer:
    """Real-time pacing: a block of n samples is released when it would have been recorded."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.t0 = time.monotonic()
        self.emitted = 0

    def delay_for(self, n: int) -> float:
        """Seconds to wait before releasing the next `n` samples (resyncs after a long stall)."""
        self.emitted += n
        delay = self.t0 + self.emitted / self.rate - time.monotonic()
        if delay < -1.0:  # e.g. the machine was suspended: do not burst to catch up
            self.t0 = time.monotonic() - self.emitted / self.rate
            delay = 0.0
        return delay


# -- microphone ----------------------------------------------------------------------


def _sd() -> Any:
    """Import sounddevice, turning a missing PortAudio into a CaptureError."""
    try:
        import sounddevice
    except OSError as exc:  # libportaudio2 missing
        raise CaptureError(f"PortAudio is not available ({exc}): install libportaudio2") from exc
    return sounddevice


def _input_devices(sd: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, info) of every device with input channels."""
    return [(i, dict(d)) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


def resolve_input_device(device: str | int | None) -> tuple[int, dict[str, Any]]:
    """Find the input device for a config value (index, name substring or None = default)."""
    sd = _sd()
    inputs = _input_devices(sd)
    hint = "run `earshot devices` to list them"
    if not inputs:
        raise CaptureError("no audio input device found: plug in a microphone, or use a file/ffmpeg/demo source")
    if device is None:
        idx = sd.default.device[0]
        if idx is None or idx < 0:
            idx = inputs[0][0]
        return _check_input(sd, int(idx), hint)
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        return _check_input(sd, int(device), hint)
    wanted = str(device).lower()
    exact = [(i, d) for i, d in inputs if str(d["name"]).lower() == wanted]
    matches = exact or [(i, d) for i, d in inputs if wanted in str(d["name"]).lower()]
    if not matches:
        raise CaptureError(f"no input device matches '{device}': {hint}")
    if len(matches) > 1:
        _LOGGER.info(
            "device '%s' matches %s; using the first",
            device,
            ", ".join(f"{i} ({d['name']})" for i, d in matches),
        )
    return matches[0]


def _check_input(sd: Any, idx: int, hint: str) -> tuple[int, dict[str, Any]]:
    """Validate a device index as an input device."""
    try:
        info = dict(sd.query_devices(idx))
    except (ValueError, sd.PortAudioError) as exc:
        raise CaptureError(f"there is no audio device {idx}: {hint}") from exc
    if info["max_input_channels"] <= 0:
        raise CaptureError(f"audio device {idx} ({info['name']}) has no input channels: {hint}")
    return idx, info


class MicCapture(Capture):
    """A sound card input through PortAudio; reopens the device with backoff if it disappears."""

    _open_lock = threading.Lock()
    _open_streams = 0  # streams open in this process (PortAudio is re-initialised only when 0)

    def __init__(self, cfg: SourceConfig, target_rate: int, stop: threading.Event) -> None:
        """See `Capture`."""
        super().__init__(cfg, target_rate, stop)
        self.device_index: int | None = None
        """PortAudio index of the opened device."""
        self.device_name = ""
        """Name of the opened device."""
        self.reopens = 0
        """Times the stream was reopened after a failure."""
        self._stream: Any = None
        self._channels = 1
        self._channel: int | None = None
        self._blocksize = 0
        self._scratch = np.zeros(0, dtype=np.float32)
        self._callbacks = 0  # incremented by the callback: proves the stream is alive

    def start(self) -> None:
        """Open the input device and start the stream and its supervisor thread."""
        idx, info = resolve_input_device(self.cfg.device)
        max_in = int(info["max_input_channels"])
        channel = self.cfg.channel
        if channel is not None:
            if not 0 <= int(channel) < max_in:
                raise CaptureError(
                    f"device {idx} ({info['name']}) has {max_in} input channels; channel {channel} does not exist "
                    "(channels count from 0)"
                )
            self._channel, self._channels = int(channel), int(channel) + 1
        else:
            self._channel = None
            self._channels = max_in if max_in <= MAX_VIRTUAL_CHANNELS else 2
        rate = int(self.cfg.samplerate or round(float(info["default_samplerate"])))
        self._setup_rate(rate)
        self._blocksize = max(1, int(round(rate * float(self.cfg.block_ms) / 1000.0)))
        self._scratch = np.zeros(self._blocksize, dtype=np.float32)
        try:
            self._open(idx)
        except CaptureError:
            raise
        except Exception as exc:  # PortAudioError, ValueError: unsupported rate/channels, busy device
            raise CaptureError(
                f"cannot open input device {idx} ({info['name']}) at {rate} Hz, {self._channels} channel(s): "
                f"{exc}; set `samplerate`/`channel` for the source or pick another device"
            ) from exc
        _LOGGER.info(
            "source %s: capturing from device %d (%s) at %d Hz, %d channel(s)%s",
            self.name,
            idx,
            info["name"],
            rate,
            self._channels,
            f", using channel {self._channel}" if self._channel is not None else ", downmixed",
        )
        self._spawn(self._supervise, "mic-supervisor")

    def _callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio callback: only copy into the ring and count flags (no allocation, logging or locks)."""
        if status:
            self.status_flags += 1
        self._callbacks += 1
        if self._channel is not None:
            self.ring.write(indata[:, self._channel])
        elif self._channels == 1:
            self.ring.write(indata[:, 0])
        elif frames <= self._scratch.shape[0]:
            out = self._scratch[:frames]
            np.mean(indata, axis=1, out=out)
            self.ring.write(out)
        else:  # PortAudio never exceeds the requested block size; keep working if it does
            self.ring.write(indata.mean(axis=1))

    def _open(self, idx: int) -> None:
        """Open and start the PortAudio stream on device `idx`."""
        sd = _sd()
        stream = sd.InputStream(
            device=idx,
            channels=self._channels,
            samplerate=self.samplerate,
            blocksize=self._blocksize,
            dtype="float32",
            callback=self._callback,
        )
        try:
            stream.start()
        except Exception:
            _bounded_call(stream.close, JOIN_TIMEOUT_S, f"{self.name}-close")
            raise
        info = dict(sd.query_devices(idx))
        self.device_index, self.device_name = idx, str(info["name"])
        self._stream = stream
        with MicCapture._open_lock:
            MicCapture._open_streams += 1

    def _close(self) -> None:
        """Close the stream (bounded: a vanished device can hang PortAudio)."""
        stream, self._stream = self._stream, None
        if stream is None:
            return
        _bounded_call(lambda: stream.close(ignore_errors=True), JOIN_TIMEOUT_S, f"{self.name}-close")
        with MicCapture._open_lock:
            MicCapture._open_streams -= 1

    def _alive(self, stream: Any) -> bool:
        """Whether the stream is still running (PortAudio errors count as dead)."""
        try:
            return bool(stream.active)
        except Exception:  # PortAudioError from a vanished device
            return False

    def _supervise(self) -> None:
        """Watch the stream; when it dies or stalls, close it and reopen with backoff until stop."""
        stall_s = max(2.0, 20 * self._blocksize / self.samplerate)
        seen, seen_at = self._callbacks, time.monotonic()
        while not self._sleep(0.2):
            stream = self._stream
            now = time.monotonic()
            if self._callbacks != seen:
                seen, seen_at = self._callbacks, now
            if stream is not None and self._alive(stream) and now - seen_at < stall_s:
                continue
            why = "stopped" if stream is None or not self._alive(stream) else f"delivered nothing for {now - seen_at:.1f} s"
            _LOGGER.error("source %s: input stream %s (device unplugged?); reopening", self.name, why)
            self._close()
            if not self._reopen():
                break
            seen, seen_at = self._callbacks, time.monotonic()
        self._close()

    def _reopen(self) -> bool:
        """Try to reopen the configured device with exponential backoff; False when stopping."""
        backoff = BACKOFF_MIN_S
        while not self._sleep(backoff):
            try:
                with MicCapture._open_lock:
                    alone = MicCapture._open_streams == 0
                if alone:
                    # PortAudio enumerates devices once; re-initialise so a re-plugged
                    # device is found (only safe with no other stream open).
                    sd = _sd()
                    sd._terminate()
                    sd._initialize()
                idx, _info = resolve_input_device(self.cfg.device)
                self._open(idx)
            except Exception as exc:  # CaptureError, PortAudioError: device still missing/busy
                _LOGGER.warning("source %s: cannot reopen input (%s); retrying in %.0f s", self.name, exc, backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            self.reopens += 1
            _LOGGER.info("source %s: input reopened on device %s (%s)", self.name, self.device_index, self.device_name)
            return True
        return False

    def stop(self) -> None:
        """Stop the supervisor and close the stream."""
        super().stop()
        self._close()


# -- file ----------------------------------------------------------------------------


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
                    if self.cfg.loop and f.frames > 0:
                        f.seek(0)
                        continue
                    break
                mono = x[:, int(channel)] if channel is not None else x.mean(axis=1, dtype=np.float32)
                if not self._emit(np.ascontiguousarray(mono, dtype=np.float32), pace):
                    break
        finally:
            f.close()
            self.source_done.set()
            self.ring.notify()


# -- synthetic demo ------------------------------------------------------------------


class DemoCapture(Capture):
    """Synthetic scenes (`synth.scene`) with alarms, gunshots and glass breaks, for machines without a microphone."""

    SCENE_S = 60.0
    """Length of one generated scene (s); looping plays a new scene (next seed) each time."""

    def start(self) -> None:
        """Start the generator thread (the scene is made at the model rate: no resampling)."""
        self._setup_rate(self.target_rate)
        _LOGGER.info("source %s: playing synthetic demo scenes%s", self.name, " in a loop" if self.cfg.loop else "")
        self._spawn(self._run, "demo")

    def _run(self) -> None:
        """Generator thread: make a scene, play it block by block, log each event as it starts."""
        sr = self.samplerate
        block = max(1, int(round(sr * float(self.cfg.block_ms) / 1000.0)))
        pace = _Pacer(sr) if self.cfg.realtime else None
        seed = 0
        t_offset = 0.0
        try:
            while not self._stopping():
                audio, annotations = synth.scene(sr, self.SCENE_S, seed)
                pending = collections.deque(annotations)
                for i in range(0, audio.shape[0], block):
                    while pending and pending[0][0] * sr < i + block:
                        onset, offset, label = pending.popleft()
                        _LOGGER.info(
                            "source %s: demo plays %s at %.1f-%.1f s", self.name, label, t_offset + onset, t_offset + offset
                        )
                    if not self._emit(audio[i : i + block], pace):
                        return
                if not self.cfg.loop:
                    return
                seed += 1
                t_offset += audio.shape[0] / sr
        finally:
            self.source_done.set()
            self.ring.notify()


# -- byte-stream sources (ffmpeg, stdin) -------------------------------------------------


class _S16Decoder:
    """Turns a byte stream of s16le samples into float32, carrying an odd trailing byte."""

    def __init__(self) -> None:
        self._rest = b""

    def decode(self, chunk: bytes) -> np.ndarray:
        """Decode as many whole samples as `chunk` (plus any carried byte) holds."""
        data = self._rest + chunk
        whole = len(data) - (len(data) % 2)
        self._rest = data[whole:]
        return np.frombuffer(data[:whole], dtype="<i2").astype(np.float32) / 32768.0


class FfmpegCapture(Capture):
    """Anything ffmpeg can read (RTSP/HTTP streams, ALSA devices, files), decoded to s16le mono by a subprocess.

    When ffmpeg exits or stops delivering for `stall_timeout_s`, its stderr tail is
    logged and it is restarted with exponential backoff (1..30 s) until stop. A local
    file that ffmpeg finishes cleanly ends the source (unless `loop`).
    """

    stall_timeout_s = 15.0
    """Seconds without output after which a running ffmpeg is considered stuck and restarted."""
    read_bytes = 8192
    """Bytes read from ffmpeg's stdout at a time."""

    def __init__(self, cfg: SourceConfig, target_rate: int, stop: threading.Event) -> None:
        """See `Capture`."""
        super().__init__(cfg, target_rate, stop)
        self.restarts = 0
        """Times ffmpeg was restarted after exiting or stalling."""
        self._proc: subprocess.Popen[bytes] | None = None
        self._ffmpeg = ""

    def _is_local_file(self) -> bool:
        """Whether the input is a local file (finite, can be read faster than real time)."""
        url = str(self.cfg.url)
        return url.startswith("file:") or (not self.cfg.ffmpeg_args and os.path.isfile(url))

    def command(self) -> list[str]:
        """The ffmpeg command line for this source."""
        args = [self._ffmpeg or "ffmpeg", "-nostdin", "-loglevel", "error", *map(str, self.cfg.ffmpeg_args)]
        if self._is_local_file() and self.cfg.realtime:
            args.append("-re")  # read a file at its native rate, like a live stream
        args += ["-i", str(self.cfg.url), "-vn", "-f", "s16le", "-ac", "1", "-ar", str(self.samplerate), "-"]
        return args

    def start(self) -> None:
        """Check ffmpeg and the URL, then start the reader thread (which starts ffmpeg)."""
        if not self.cfg.url:
            raise CaptureError(f"source '{self.name}' has kind = \"ffmpeg\" but no url: set `url`")
        found = shutil.which("ffmpeg")
        if found is None:
            raise CaptureError("ffmpeg is not installed: install it (e.g. `apt install ffmpeg`) or use another source kind")
        self._ffmpeg = found
        self._setup_rate(self.target_rate)  # ffmpeg resamples to the model rate itself
        _LOGGER.info("source %s: reading %s through ffmpeg", self.name, self.cfg.url)
        self._spawn(self._run, "ffmpeg")

    def _run(self) -> None:
        """Reader thread: run ffmpeg, read its output, restart it with backoff when it ends or stalls."""
        backoff = BACKOFF_MIN_S
        try:
            while not self._stopping():
                got, rc, why, tail = self._run_once()
                if self._stopping():
                    break
                if rc == 0 and self._is_local_file() and not self.cfg.loop:
                    _LOGGER.info("source %s: ffmpeg reached the end of %s", self.name, self.cfg.url)
                    break
                if got >= 5 * self.samplerate:
                    backoff = BACKOFF_MIN_S  # it worked for a while: this is a new failure, not the same one
                _LOGGER.warning(
                    "source %s: ffmpeg %s (exit code %s)%s; restarting in %.0f s",
                    self.name,
                    why,
                    rc,
                    f": {tail}" if tail else "",
                    backoff,
                )
                if self._sleep(backoff):
                    break
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                self.restarts += 1
        finally:
            self.source_done.set()
            self.ring.notify()

    def _run_once(self) -> tuple[int, int | None, str, str]:
        """Run ffmpeg until it exits, stalls or we stop; return (samples, exit code, why, stderr tail)."""
        try:
            proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        except OSError as exc:
            return 0, None, f"could not start ({exc})", ""
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        err_lines: collections.deque[str] = collections.deque(maxlen=5)
        err_thread = threading.Thread(
            target=_drain_lines, args=(proc.stderr, err_lines), name=f"earshot-{self.name}-ffmpeg-stderr", daemon=True
        )
        err_thread.start()
        fd = proc.stdout.fileno()
        decoder = _S16Decoder()
        got = 0
        why = "exited"
        last_data = time.monotonic()
        try:
            while not self._stopping():
                ready, _, _ = select.select([fd], [], [], 0.2)
                if not ready:
                    if time.monotonic() - last_data > self.stall_timeout_s:
                        why = f"delivered nothing for {self.stall_timeout_s:.0f} s"
                        break
                    continue
                chunk = os.read(fd, self.read_bytes)
                if not chunk:
                    break
                last_data = time.monotonic()
                x = decoder.decode(chunk)
                if x.size and not self._emit(x, None):
                    break
                got += x.size
                last_data = time.monotonic()  # time spent under back-pressure is not a stall
        finally:
            _terminate(proc)
            err_thread.join(1.0)
            proc.stdout.close()
            self._proc = None
        return got, proc.returncode, why, " | ".join(err_lines)

    def stop(self) -> None:
        """Stop the reader thread and kill ffmpeg if it is still running."""
        self._halt.set()
        proc = self._proc
        if proc is not None:
            _terminate(proc)
        super().stop()


def _drain_lines(stream: IO[bytes], lines: collections.deque[str]) -> None:
    """Keep the last lines of a subprocess's stderr (and keep the pipe from filling up)."""
    try:
        for raw in iter(stream.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if line:
                lines.append(line)
    except (OSError, ValueError):  # pipe closed under us at shutdown
        pass
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """Terminate a subprocess, killing it if it does not exit within a second."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(1.0)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(1.0)
        except subprocess.TimeoutExpired:
            _LOGGER.error("ffmpeg (pid %d) does not die", proc.pid)


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


# -- factory and device helpers ----------------------------------------------------------

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


def list_devices() -> str:
    """A readable table of the audio input devices PortAudio sees (for `earshot devices`)."""
    try:
        sd = _sd()
        inputs = _input_devices(sd)
        default_in = sd.default.device[0]
    except CaptureError as exc:
        return str(exc)
    except Exception as exc:  # PortAudioError while querying: report instead of a traceback
        return f"cannot list audio devices: {exc}"
    if not inputs:
        return "no audio input devices found: plug in a microphone (check `arecord -l`), or use a file, ffmpeg or demo source"
    rows = [("", "index", "name", "channels", "default rate")]
    for i, d in inputs:
        rows.append(
            (
                "*" if i == default_in else "",
                str(i),
                str(d["name"]),
                str(d["max_input_channels"]),
                f"{float(d['default_samplerate']):.0f} Hz",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("(* = default input; set `device` to an index or part of a name)")
    return "\n".join(lines)


def has_input_device() -> bool:
    """Whether PortAudio sees at least one input device (else `make run` falls back to the demo)."""
    try:
        return bool(_input_devices(_sd()))
    except Exception:  # no PortAudio or a broken driver both mean "no usable input"
        return False


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
