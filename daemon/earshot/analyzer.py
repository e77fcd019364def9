"""One stream's detection chain: samples -> log-mel frames -> CNN per hop -> level gate -> events.

Two analyzers produce the same hops and events:

- `StreamAnalyzer` for live audio: every hop runs as soon as its audio is in (StreamingScorer);
- `BatchAnalyzer` for files (`earshot detect`, evaluation): blocks of tens of seconds are
  scored in large batches (score_windows), which tests show equal the streaming scores.

Both share the level gate and the event state machine, so what is measured offline is what runs
on a microphone.

End of a stream (`finish`): audio the hop grid has not scored yet is scored by one more window
that ends at the last frame, so a clip shorter than one window (1 s) is scored and a sound in a
file's last partial hop is heard. A clip shorter than a window is padded *in front* with its own
quietest value of each mel band, as if its background had gone on before it: the window then ends
where the audio ends, so onsets are not shifted, and the padding looks like a quiet room rather
than digital silence, which real streams do not contain. Events still waiting for confirmation when
the audio ends are reported (see `Detector.flush`).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from typing import Any
from dataclasses import dataclass

import numpy as np

from .config import ConfigError, DetectConfig, FrontendConfig
from .detect import Detector, make_rules
from .events import Event
from .features import StreamingFeatures, push_many
from .model import CascadeState, ScoringModel as LoadedModel  # a torch LoadedModel or an OnnxModel

SILENCE_DBFS = -120.0
"""Level reported for digital silence (dBFS)."""
_NO_MEL = np.zeros(0, dtype=np.float32)
"""`Hop.mel` while nobody reads spectrogram columns."""


@dataclass(frozen=True)
class Hop:
    """What one hop produced: for live views, metrics and score streams."""

    t_end: float
    """End of the scored window (stream seconds)."""
    scores: np.ndarray
    """Class scores (0..1) in the model's label order; zero when gated by level."""
    level_dbfs: float
    """RMS level of the window's last hop of audio (dBFS)."""
    mel: np.ndarray
    """Mean of the window's last hop of feature frames (n_mels,): a spectrogram column for live views."""


def hop_frames(frontend: FrontendConfig, loaded: LoadedModel) -> int:
    """Frames per hop, checking the runtime window against the model's."""
    p = loaded.frontend
    if abs(frontend.chunk_size - p.chunk_s) > 1e-6:
        raise ConfigError([
            f"frontend.chunk_size is {frontend.chunk_size} s but the model was trained on {p.chunk_s} s windows; "
            f"set chunk_size = {p.chunk_s} or use a model trained for {frontend.chunk_size} s"
        ])
    n = round(frontend.chunk_hop / p.frame_s)
    if n < 1 or abs(n * p.frame_s - frontend.chunk_hop) > 1e-6:
        raise ConfigError([f"frontend.chunk_hop: {frontend.chunk_hop} s is not a multiple of {p.frame_s} s frames"])
    return n


def level_dbfs(samples: np.ndarray) -> float:
    """RMS level in dB relative to full scale."""
    if samples.size == 0:
        return SILENCE_DBFS
    ms = float(np.mean(np.square(samples, dtype=np.float64)))
    return max(SILENCE_DBFS, 10.0 * math.log10(ms)) if ms > 0 else SILENCE_DBFS


def _clean(samples: np.ndarray) -> np.ndarray:
    """Mono float32 with NaN/inf replaced by silence: one bad sample must not poison the running level."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if not np.isfinite(samples).all():
        samples = np.nan_to_num(samples, nan=0.0, posinf=0.0, neginf=0.0)
    return samples


class _History:
    """The latest samples of a stream, addressed by absolute sample index."""

    def __init__(self) -> None:
        self.start = 0  # absolute index of buf[0]
        self.buf = np.zeros(0, dtype=np.float32)

    @property
    def end(self) -> int:
        return self.start + self.buf.size

    def append(self, samples: np.ndarray) -> None:
        self.buf = np.concatenate([self.buf, samples])

    def slice(self, a: int, b: int) -> np.ndarray:
        return self.buf[max(0, a - self.start): max(0, b - self.start)]

    def keep_from(self, index: int) -> None:
        drop = min(max(0, index - self.start), self.buf.size)
        if drop:
            self.buf = self.buf[drop:].copy()
            self.start += drop


class _Analyzer:
    """What both analyzers share: hop geometry, the level gate and the detector."""

    mel_wanted = True
    """Whether hops carry their spectrogram column; the worker turns it off while no tap reads `Hop.mel`."""

    def __init__(self, loaded: LoadedModel, frontend: FrontendConfig, detect: DetectConfig, *, source: str,
                 node: str, to_wall: Callable[[float], float] | None = None,
                 on_hop: Callable[[Hop], None] | None = None):
        p = self.params = loaded.frontend
        self.loaded = loaded  # scores through its backend (torch or ONNX Runtime)
        self.hop_frames = hop_frames(frontend, loaded)
        self.hop_samples = self.hop_frames * p.hop_length
        self.labels = list(loaded.labels)
        self.min_level_dbfs = detect.min_level_dbfs
        self.detector = Detector(
            self.labels, make_rules(self.labels, loaded.thresholds, detect), source=source, node=node,
            chunk_s=p.chunk_s, hop_s=self.hop_frames * p.frame_s, to_wall=to_wall or self.live_wall,
        )
        self.on_hop = on_hop
        self.features = StreamingFeatures(p)
        self.audio = _History()
        confirmer = getattr(loaded, "confirmer", None)
        self.cascade = CascadeState(confirmer) if confirmer is not None else None
        self.confirm_samples = int(round(confirmer.window_s * p.sample_rate)) if confirmer is not None else 0

    @property
    def seconds_in(self) -> float:
        """Audio received so far (s)."""
        return self.audio.end / self.params.sample_rate

    def live_wall(self, t: float) -> float:
        """Unix time of stream time `t` for live audio, whose newest sample is "now" (the default clock)."""
        return time.time() - (self.seconds_in - t)

    def finish(self) -> list[Event]:
        """End the stream: scores the audio no hop has covered yet, then closes events in progress."""
        events = self._score_end()
        return events + self.detector.flush(self.seconds_in)

    def _score_end(self) -> list[Event]:
        return []

    def _last_window(self, recent: np.ndarray, end_frame: int) -> list[Event]:
        """Score one window ending at absolute frame `end_frame` from the latest frames `recent`.

        A stream shorter than one window is padded in front with its quietest value per band (module doc).
        """
        c = self.params.chunk_frames
        if len(recent) < c:
            pad = np.repeat(recent.min(axis=0, keepdims=True), c - len(recent), axis=0)
            recent = np.concatenate([pad, recent])
        recent = np.ascontiguousarray(recent[-c:], dtype=np.float32)
        _, scores = self.loaded.score_windows(recent, c, self.hop_frames)
        return self._hop(end_frame, scores[0], recent[-self.hop_frames:].mean(axis=0) if self.mel_wanted else _NO_MEL)

    def _hop(self, end_frame: int, scores: np.ndarray, mel: np.ndarray) -> list[Event]:
        p = self.params
        end_sample = p.samples_for(end_frame)
        level = level_dbfs(self.audio.slice(end_sample - self.hop_samples, end_sample))
        if level < self.min_level_dbfs:
            scores = np.zeros_like(scores)
            if self.cascade is not None:
                self.cascade.reset()
        elif self.cascade is not None:
            scores = self.cascade.apply(scores, lambda: self.audio.slice(end_sample - self.confirm_samples, end_sample))
        t_end = end_sample / p.sample_rate
        if self.on_hop is not None:
            self.on_hop(Hop(t_end, scores, level, mel))
        return self.detector.update(t_end, scores)

    def _first_sample_needed(self, next_end_frame: int) -> int:
        """Oldest sample a window ending at `next_end_frame` or later still needs for its level."""
        p = self.params
        return p.samples_for(next_end_frame) - max(self.hop_samples, self.confirm_samples)


class StreamAnalyzer(_Analyzer):
    """Live detection for one source: `push(samples) -> events` as audio arrives."""

    def __init__(self, loaded: LoadedModel, frontend: FrontendConfig, detect: DetectConfig, **kw):
        super().__init__(loaded, frontend, detect, **kw)
        self._scorer: Any = None  # built on the first push(); the service's worker shares one scorer instead
        self.frames_out = 0
        self._recent = np.zeros((0, self.params.n_mels), dtype=np.float32)  # the frames of the last hop or more
        self._window: collections.deque[np.ndarray] = collections.deque()  # at least the last window's frames
        self._window_n = 0
        self._scored_to = 0  # end frame of the last window scored

    def push(self, samples: np.ndarray) -> list[Event]:
        """Feed audio (float32 mono at the model rate); returns the events it completed."""
        if self._scorer is None:
            self._scorer = self.loaded.streaming_scorer(self.params.chunk_frames, self.hop_frames)
        return self.scored(self._scorer.push(self.frames(samples)))

    def frames(self, samples: np.ndarray) -> np.ndarray:
        """First half of `push`: audio in, new log-mel frames out (for a scorer shared by several streams)."""
        samples = self._take(samples)
        if samples.size == 0:
            return np.zeros((0, self.params.n_mels), dtype=np.float32)
        return self._took(self.features.push(samples))

    def _take(self, samples: np.ndarray) -> np.ndarray:
        """Clean and keep the audio (the part of `frames` before the log-mel)."""
        samples = _clean(samples)
        if samples.size:
            self.audio.append(samples)
        return samples

    def _took(self, frames: np.ndarray) -> np.ndarray:
        """Count and keep the new frames (the part of `frames` after the log-mel)."""
        self._keep_window(frames)
        if self.on_hop is not None and self.mel_wanted:
            self._recent = np.concatenate([self._recent, frames])[-(self.hop_frames + len(frames)):]
        return frames

    def scored(self, results: list[tuple[int, np.ndarray]]) -> list[Event]:
        """Second half of `push`: the scorer's (end_frame, scores) for this stream in, events out."""
        events: list[Event] = []
        for end_frame, scores in results:
            self._scored_to = max(self._scored_to, end_frame)
            if self.mel_wanted:
                back = self.frames_out - end_frame  # frames received after this window ended
                hop_mel = self._recent[max(0, len(self._recent) - back - self.hop_frames): len(self._recent) - back]
            else:
                hop_mel = _NO_MEL
            events += self._hop(end_frame, scores, hop_mel.mean(axis=0) if len(hop_mel) else hop_mel)
        next_end = max(self.params.chunk_frames, self.frames_out + 1)
        self.audio.keep_from(self._first_sample_needed(next_end - self.hop_frames))  # a hop more, for `finish`
        return events

    def _keep_window(self, frames: np.ndarray) -> None:
        """Count new frames and keep the latest window's worth for `finish` (cheap: no copy per hop)."""
        self.frames_out += len(frames)
        if len(frames):
            self._window.append(frames)
            self._window_n += len(frames)
            while self._window_n - len(self._window[0]) >= self.params.chunk_frames:
                self._window_n -= len(self._window.popleft())

    def _score_end(self) -> list[Event]:
        self._keep_window(self.features.flush())
        if self.frames_out <= self._scored_to:
            return []
        self._scored_to = self.frames_out
        return self._last_window(np.concatenate(self._window), self.frames_out)


def frames_many(analyzers: list[StreamAnalyzer], blocks: list[np.ndarray]) -> list[np.ndarray]:
    """`[a.frames(x) for a, x in zip(analyzers, blocks)]` with one log-mel pass for all (`push_many`).

    The service's worker calls this once per loop for every stream that has a hop of audio.
    """
    taken = [a._take(x) for a, x in zip(analyzers, blocks)]
    frames = push_many([a.features for a in analyzers], taken)
    return [a._took(f) for a, f in zip(analyzers, frames)]


class BatchAnalyzer(_Analyzer):
    """File detection: the same hops and events as StreamAnalyzer, scored a block at a time."""

    def __init__(self, loaded: LoadedModel, frontend: FrontendConfig, detect: DetectConfig, **kw):
        super().__init__(loaded, frontend, detect, **kw)
        p = self.params
        self.frames = np.zeros((0, p.n_mels), dtype=np.float32)
        self.frames_start = 0  # absolute index of self.frames[0]
        self.next_end = p.chunk_frames  # absolute end frame of the next window to score

    def push(self, samples: np.ndarray) -> list[Event]:
        """Feed a block of audio (any length; tens of seconds is efficient)."""
        samples = _clean(samples)
        if samples.size == 0:
            return []
        p = self.params
        self.audio.append(samples)
        self.frames = np.concatenate([self.frames, self.features.push(samples)])
        total = self.frames_start + len(self.frames)
        events: list[Event] = []
        if total >= self.next_end:
            # Window ends are chunk_frames + k*hop_frames in absolute frames; starting the batch at
            # next_end - chunk_frames keeps score_windows' windows on that grid.
            base = self.next_end - p.chunk_frames
            local = self.frames[base - self.frames_start:]
            ends, scores = self.loaded.score_windows(local, p.chunk_frames, self.hop_frames)
            for end, row in zip(ends, scores):
                events += self._hop(base + int(end), row, local[int(end) - self.hop_frames:int(end)].mean(axis=0))
            self.next_end = base + int(ends[-1]) + self.hop_frames if len(ends) else self.next_end
        keep = max(0, self.next_end - p.chunk_frames - self.hop_frames)  # a hop more, for `finish`
        self.frames = self.frames[keep - self.frames_start:]
        self.frames_start = keep
        self.audio.keep_from(self._first_sample_needed(self.next_end - self.hop_frames))  # a hop more, for `finish`
        return events

    def _score_end(self) -> list[Event]:
        p = self.params
        tail = self.features.flush()  # a stream shorter than one window: its frames were held back
        if len(tail):
            self.frames = np.concatenate([self.frames, tail])
        total = self.frames_start + len(self.frames)
        scored_to = self.next_end - self.hop_frames if self.next_end > p.chunk_frames else 0
        if total <= scored_to:
            return []
        self.next_end = total + self.hop_frames
        return self._last_window(self.frames[-p.chunk_frames:], total)
