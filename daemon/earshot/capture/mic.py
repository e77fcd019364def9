"""Microphone source: a sound card input through PortAudio, reopened with backoff if it disappears."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import BACKOFF_MAX_S, BACKOFF_MIN_S, JOIN_TIMEOUT_S, Capture, CaptureError
from .devices import _sd, resolve_input_device

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

_LOGGER = logging.getLogger(__name__)

MAX_VIRTUAL_CHANNELS = 8
"""Devices advertising more input channels than this (ALSA `pulse`/`default`) are virtual: open them in stereo."""


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
        self._blocksize = self.cfg.block_samples(rate)
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
