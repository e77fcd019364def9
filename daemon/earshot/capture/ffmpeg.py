"""ffmpeg source: anything ffmpeg reads (RTSP/HTTP streams, ALSA, files) decoded by a supervised subprocess."""

from __future__ import annotations

import collections
import logging
import os
import select
import shutil
import subprocess
import threading
import time
from typing import IO, TYPE_CHECKING

from .base import BACKOFF_MAX_S, BACKOFF_MIN_S, Capture, CaptureError, _S16Decoder

if TYPE_CHECKING:  # only for annotations: capture works with any object with these attributes
    from ..config import SourceConfig

_LOGGER = logging.getLogger(__name__)


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
