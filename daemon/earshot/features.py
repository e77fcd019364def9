"""Streaming log-mel frontend: audio samples -> gain-invariant log-mel frames (rows).

Two entry points compute the same numbers:

- `features(samples, p)` for a whole signal (offline: training, evaluation, replay);
- `StreamingFeatures(p).push(block)` for live audio in blocks of any size. Each STFT frame
  is computed exactly once, when its last sample arrives, and the concatenated output
  equals `features()` of the concatenated input (tested to 1e-5).

Gain invariance. `features` is the log-mel minus a causal running broadband level (an
exponential moving average over frames of the per-frame mean log-mel). Why:

- loudness is not a cue for *what* a sound is, but in the training data glass-break clips
  happen to be louder than the negatives, so a network fed raw log-mel learns "loud means
  glass" and fires on any slammed door;
- users' microphones and capture chains differ in gain by tens of dB, so absolute levels
  do not transfer from the training data to a deployment anyway;
- a multiplicative gain g adds the constant 2*ln(g) to every log-mel value (away from the
  log floor) and therefore also to the running level, so it cancels exactly;
- unlike per-window normalisation (mean/std over a 1 s window), the running level is a
  causal IIR filter whose state carries across blocks, so streaming output is *exactly*
  the offline output and each frame is normalised once rather than once per window.

Start of a stream. The running level starts at the median of the per-frame means of the first
window (`chunk_frames` frames, or all frames of a shorter signal), not at the first frame: one
25 ms frame is a poor estimate of a room's level, and a stream that opens on a few frames of
digital silence (a sound card starting, a file with a silent lead-in) would otherwise make
everything in its first seconds look tens of dB louder than it is. Nothing is scored before the
first window is complete, so the streaming frontend holds its first frames back until then at no
cost in latency. Measured with the shipped model on 400 recordings of `../shared/data` started cold
3 s in, against the same windows with 3 s of history (first 3 s after the start): with 30 ms of
digital silence first, the level error fell from 2.23 to 1.01 (natural-log units) and the files
with a threshold crossing that the warmed-up stream does not have from 7 to 3; without the lead-in,
1.23 -> 1.03 and 2 -> 3 files.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

_LOGGER = logging.getLogger(__name__)

_LOOP_FRAMES = 1024
"""Up to this many frames (10 s) the level filter runs as a Python loop (live audio: a hop, or the
first window, or a ring's worth after a stall), beyond it in scipy (whole files, offline)."""
_BLOCK_FRAMES = 4096
"""Frames per vectorised STFT block in `log_mel`: bounds memory (about 17 MB) on hour-long files."""


@dataclass(frozen=True)
class FrontendParams:
    """Parameters of the log-mel frontend; stored in every checkpoint and checked at load."""

    sample_rate: int = 16000
    """Sample rate of the audio fed to the frontend (Hz)."""
    n_fft: int = 512
    """FFT size (samples); the window is zero-padded to this length."""
    win_length: int = 400
    """Analysis window length (samples): 25 ms periodic Hann at 16 kHz."""
    hop_length: int = 160
    """Hop between frames (samples): 10 ms at 16 kHz."""
    n_mels: int = 64
    """Number of mel bands (Slaney mel scale, Slaney area normalisation)."""
    f_min: float = 50.0
    """Lowest filterbank edge (Hz)."""
    f_max: float = 8000.0
    """Highest filterbank edge (Hz); at most sample_rate / 2."""
    log_floor: float = 1e-6
    """Added to the mel power before the natural log (power units of float audio in [-1, 1])."""
    level_tau_s: float = 3.0
    """Time constant of the running broadband level subtracted for gain invariance (s)."""
    chunk_frames: int = 100
    """Frames per classifier window (frames): 100 frames = 1 s at a 10 ms hop."""

    def __post_init__(self) -> None:
        problems = []
        for name in ("sample_rate", "n_fft", "win_length", "hop_length", "n_mels", "chunk_frames"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                problems.append(f"{name} must be a positive integer, got {value!r}")
        for name in ("f_min", "f_max", "log_floor", "level_tau_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                problems.append(f"{name} must be a finite number, got {value!r}")
        if not problems:
            if self.win_length > self.n_fft:
                problems.append(f"win_length ({self.win_length}) must not exceed n_fft ({self.n_fft})")
            if not 0 <= self.f_min < self.f_max <= self.sample_rate / 2:
                problems.append(
                    f"need 0 <= f_min < f_max <= sample_rate/2, got f_min={self.f_min}, f_max={self.f_max}"
                )
            if self.log_floor <= 0 or self.level_tau_s <= 0:
                problems.append("log_floor and level_tau_s must be positive")
        if problems:
            raise ValueError("invalid frontend parameters: " + "; ".join(problems))

    @property
    def frame_s(self) -> float:
        """Hop between frames (s)."""
        return self.hop_length / self.sample_rate

    @property
    def chunk_s(self) -> float:
        """Duration covered by `chunk_frames` hops (s); the classifier window length."""
        return self.chunk_frames * self.frame_s

    def samples_for(self, frames: int) -> int:
        """Samples that `frames` frames span: the end of frame `frames - 1`, so also where a window
        ending at frame index `frames` ends in the audio (the daemon dates and cuts hops with it)."""
        return (frames - 1) * self.hop_length + self.win_length

    @property
    def level_alpha(self) -> float:
        """Per-frame decay of the running level: exp(-hop / tau)."""
        return math.exp(-self.frame_s / self.level_tau_s)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields (for checkpoints and logs)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FrontendParams:
        """Inverse of `to_dict`; unknown keys are an error, missing keys take defaults."""
        if not isinstance(d, dict):
            raise ValueError(f"frontend parameters must be a dict, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown frontend parameter(s): {', '.join(map(str, unknown))} (known: {', '.join(sorted(known))})"
            )
        return cls(**d)


def frames_in(n_samples: int, p: FrontendParams = FrontendParams()) -> int:
    """Number of complete frames in `n_samples` samples: 1 + (N - win)//hop, or 0 if N < win."""
    if n_samples < p.win_length:
        return 0
    return 1 + (n_samples - p.win_length) // p.hop_length


# ------------------------------------------------------------------------------------------
# Filterbank and window


# Slaney mel scale (librosa's default, htk=False): linear below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3  # Hz per mel in the linear part
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOGSTEP = math.log(6.4) / 27.0


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (as librosa with htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOGSTEP
    return np.where(hz >= _MIN_LOG_HZ, log, hz / _F_SP)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of `_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    log = _MIN_LOG_HZ * np.exp(_LOGSTEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, _F_SP * mel)


@functools.lru_cache(maxsize=8)
def mel_filterbank(p: FrontendParams) -> np.ndarray:
    """Triangular mel filterbank (n_mels, n_fft//2+1), float64; Slaney scale and area norm.

    Equals `librosa.filters.mel(htk=False, norm="slaney")`, written on numpy so librosa is
    not a runtime dependency. Cached per parameter set; treat the result as read-only.
    """
    fft_freqs = np.linspace(0.0, p.sample_rate / 2, p.n_fft // 2 + 1)
    mel_pts = np.linspace(_hz_to_mel(np.array(p.f_min)), _hz_to_mel(np.array(p.f_max)), p.n_mels + 2)
    mel_freqs = _mel_to_hz(mel_pts)  # (n_mels + 2,) band edges and centres in Hz
    fdiff = np.diff(mel_freqs)  # (n_mels + 1,)
    ramps = mel_freqs[:, None] - fft_freqs[None, :]  # (n_mels + 2, n_bins)
    lower = -ramps[:-2] / fdiff[:-1, None]  # (n_mels, n_bins) rising edge
    upper = ramps[2:] / fdiff[1:, None]  # (n_mels, n_bins) falling edge
    weights = np.maximum(0.0, np.minimum(lower, upper))
    # Slaney area normalisation: each triangle integrates to roughly constant energy.
    enorm = 2.0 / (mel_freqs[2 : p.n_mels + 2] - mel_freqs[: p.n_mels])
    weights *= enorm[:, None]
    if np.any(weights.max(axis=1) == 0):
        _LOGGER.warning("some mel bands are empty; n_mels=%d is too high for n_fft=%d", p.n_mels, p.n_fft)
    weights.setflags(write=False)
    return weights


@functools.lru_cache(maxsize=8)
def _window(p: FrontendParams) -> np.ndarray:
    """Periodic Hann window of `win_length`, zero-padded (centred) to `n_fft`, float64, read-only."""
    n = np.arange(p.win_length)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / p.win_length)  # periodic (as scipy/librosa 'hann')
    # Centred zero padding, as librosa does when win_length < n_fft; only the phase depends
    # on where the zeros go, so the power spectrum is the same either way.
    lpad = (p.n_fft - p.win_length) // 2
    win = np.zeros(p.n_fft)
    win[lpad : lpad + p.win_length] = hann
    win.setflags(write=False)
    return win


@functools.lru_cache(maxsize=8)
def _filterbank_t(p: FrontendParams) -> np.ndarray:
    """Transposed filterbank (n_bins, n_mels), contiguous, for `power @ fb_t`."""
    fb_t = np.ascontiguousarray(mel_filterbank(p).T)
    fb_t.setflags(write=False)
    return fb_t


def _frames_log_mel(frames: np.ndarray, p: FrontendParams) -> np.ndarray:
    """Log-mel of a (n, win_length) block of frames -> (n, n_mels) float32: one rfft, one matmul."""
    win = _window(p)
    lpad = (p.n_fft - p.win_length) // 2
    padded = np.zeros((frames.shape[0], p.n_fft))  # (n, n_fft) float64
    padded[:, lpad : lpad + p.win_length] = frames
    padded *= win
    spec = np.fft.rfft(padded, axis=1)  # (n, n_fft//2 + 1) complex128
    power = spec.real**2 + spec.imag**2
    mel = power @ _filterbank_t(p)  # (n, n_mels)
    return np.log(mel + p.log_floor).astype(np.float32)


def _as_mono(samples: np.ndarray) -> np.ndarray:
    """Validate a 1-D sample array (any float dtype)."""
    x = np.asarray(samples)
    if x.ndim != 1:
        raise ValueError(f"expected mono samples of shape (N,), got shape {x.shape}")
    return x


def log_mel(samples: np.ndarray, p: FrontendParams = FrontendParams()) -> np.ndarray:
    """Raw log-mel (T, n_mels) float32 of a whole signal; frame i covers [i*hop, i*hop + win).

    No centering or padding: T = frames_in(len(samples)). Power spectrum |rfft|^2, natural
    log of (mel power + log_floor).
    """
    x = _as_mono(samples)
    n = frames_in(len(x), p)
    out = np.empty((n, p.n_mels), dtype=np.float32)
    if n == 0:
        return out
    view = sliding_window_view(x, p.win_length)[:: p.hop_length]  # (>= n, win) view, no copy
    for start in range(0, n, _BLOCK_FRAMES):
        stop = min(n, start + _BLOCK_FRAMES)
        out[start:stop] = _frames_log_mel(view[start:stop], p)
    return out


def _level_filter(p: FrontendParams) -> tuple[np.ndarray, np.ndarray]:
    """(b, a) of the one-pole EMA level[t] = alpha*level[t-1] + (1-alpha)*m[t]."""
    alpha = p.level_alpha
    return np.array([1.0 - alpha]), np.array([1.0, -alpha])


def _level(frame_means: np.ndarray, p: FrontendParams, zi: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Run the level EMA over per-frame means (float64); returns (level, new state).

    `zi=None` starts a new stream: the level starts at the median of the first `chunk_frames`
    frame means (all of them if fewer), a robust estimate of the room's level (see the module doc).
    """
    if zi is None:
        zi = np.array([p.level_alpha * float(np.median(frame_means[: p.chunk_frames]))])
    if len(frame_means) <= _LOOP_FRAMES:
        # A live block is mostly a hop (10 frames): the recurrence in Python is faster than a call
        # into scipy, and leaves scipy.signal (about 1 s and 30 MB to import) out of the daemon.
        alpha = p.level_alpha
        gain = 1.0 - alpha
        state = float(zi[0])
        level = np.empty(len(frame_means))
        for i, m in enumerate(frame_means.tolist()):
            value = state + gain * m
            level[i] = value
            state = alpha * value
        return level, np.array([state])
    from scipy.signal import lfilter  # offline: whole files

    b, a = _level_filter(p)
    level, zf = lfilter(b, a, frame_means, zi=zi)
    return level, zf


def features(samples: np.ndarray, p: FrontendParams = FrontendParams()) -> np.ndarray:
    """Gain-invariant features (T, n_mels) float32: log-mel minus the causal running level."""
    lm = log_mel(samples, p)
    if lm.shape[0] == 0:
        return lm
    level, _ = _level(lm.mean(axis=1, dtype=np.float64), p, None)
    return (lm - level[:, None]).astype(np.float32)


class StreamingFeatures:
    """Stateful frontend for live audio: push blocks of any size, get each new frame once.

    Keeps the unconsumed sample tail (shorter than one window) and the level filter state. At the
    start of a stream (and after `restart_level`) the first `chunk_frames` frames are held back until
    the level's starting value is known; `flush()` returns them early when the audio ends sooner.
    Not thread-safe: one instance per stream, used by one thread.
    """

    def __init__(self, p: FrontendParams = FrontendParams()) -> None:
        self.p = p
        self._tail = np.zeros(0, dtype=np.float64)
        self._zi: np.ndarray | None = None
        self._held = np.zeros((0, p.n_mels), dtype=np.float32)  # raw log-mel waiting for the level's start
        self.frames_out = 0
        """Total frames returned since the last reset."""

    def reset(self) -> None:
        """Forget all buffered audio and the running level (start of a new stream)."""
        self._tail = np.zeros(0, dtype=np.float64)
        self._held = self._held[:0]
        self.restart_level()
        self.frames_out = 0

    def restart_level(self) -> None:
        """Start the running level again from the next frames (a device reopened: another room or gain).

        Frames already held back are kept and share the new start."""
        self._zi = None

    def flush(self) -> np.ndarray:
        """The frames still held back for the level's start (a stream shorter than one window ended)."""
        if self._zi is not None or not len(self._held):
            return np.empty((0, self.p.n_mels), dtype=np.float32)
        return self._normalise(self._held[:0], force=True)

    def _normalise(self, lm: np.ndarray, force: bool = False) -> np.ndarray:
        """Subtract the running level from raw log-mel `lm`, holding frames until the level has a start."""
        if self._zi is None:
            lm = np.concatenate([self._held, lm]) if len(self._held) else lm
            if len(lm) < self.p.chunk_frames and not force:
                self._held = lm
                return np.empty((0, self.p.n_mels), dtype=np.float32)
            self._held = self._held[:0]
        if not len(lm):
            return np.empty((0, self.p.n_mels), dtype=np.float32)
        level, self._zi = _level(lm.mean(axis=1, dtype=np.float64), self.p, self._zi)
        self.frames_out += len(lm)
        return (lm - level[:, None]).astype(np.float32)

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Append samples; return the (n_new, n_mels) float32 frames completed by them."""
        p = self.p
        x = _as_mono(samples)
        buf = np.concatenate((self._tail, x)) if self._tail.size else x.astype(np.float64, copy=True)
        n = frames_in(len(buf), p)
        if n == 0:
            self._tail = buf
            return np.empty((0, p.n_mels), dtype=np.float32)
        lm = log_mel(buf[: p.samples_for(n)], p)  # (n, n_mels)
        # Keep only what later frames still need (< win_length samples), as a copy so a
        # huge block is not kept alive by a view.
        self._tail = buf[n * p.hop_length :].copy()
        return self._normalise(lm)


def push_many(fronts: list[StreamingFeatures], blocks: list[np.ndarray]) -> list[np.ndarray]:
    """`[f.push(x) for f, x in zip(fronts, blocks)]`, with one FFT, filterbank and log for all.

    For a worker that scores many streams per loop: the per-call overhead of a dozen numpy
    operations on a hop's 10 frames costs more than their arithmetic, so the frames of every
    stream are gathered into one block. Each frame's numbers are the same as `push` gives
    (row-wise operations; tested to 1e-6). Streams with other parameters than the first are
    pushed one by one.
    """
    if not fronts:
        return []
    p = fronts[0].p
    out: list[np.ndarray | None] = [None] * len(fronts)
    bufs: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    jobs: list[tuple[int, int]] = []  # (index, frames)
    offset = 0
    for i, (f, samples) in enumerate(zip(fronts, blocks)):
        if f.p is not p and f.p != p:
            out[i] = f.push(samples)
            continue
        x = _as_mono(samples)
        buf = np.concatenate((f._tail, x)) if f._tail.size else x.astype(np.float64, copy=True)
        n = frames_in(len(buf), p)
        if n == 0:
            f._tail = buf
            out[i] = np.empty((0, p.n_mels), dtype=np.float32)
            continue
        bufs.append(buf)
        starts.append(offset + p.hop_length * np.arange(n))
        offset += len(buf)
        f._tail = buf[n * p.hop_length :].copy()
        jobs.append((i, n))
    if jobs:
        allbuf = np.concatenate(bufs)
        first = np.concatenate(starts)  # (N,) first sample of every frame, in allbuf
        lm = np.empty((len(first), p.n_mels), dtype=np.float32)
        win = np.arange(p.win_length)
        for a in range(0, len(first), _BLOCK_FRAMES):
            b = min(len(first), a + _BLOCK_FRAMES)
            lm[a:b] = _frames_log_mel(allbuf[first[a:b, None] + win], p)  # (n, win) gathered -> (n, n_mels)
        k = 0
        for i, n in jobs:
            out[i] = fronts[i]._normalise(lm[k : k + n])  # the level, and the first window held back as in push
            k += n
    return out  # type: ignore[return-value]
