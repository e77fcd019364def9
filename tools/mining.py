"""Hard-negative mining while the detector trains: the stretches of negative audio it fires on now.

Mixtures teach the network what the classes sound like; they rarely show it the few seconds in an
hour of real background that look most like a gunshot to it at this point of training (a nail gun, a
dropped pan, a cough into the microphone). That tail decides the false alarms per hour, and so the
threshold, and so the recall a user gets at a quiet threshold.

Every `every` steps `HardNegativeMiner.mine` runs the model being trained over a fresh stretch of
negative recordings joined with crossfades (`augment.fill_background`, drawn balanced over source
and kind, impulsive kinds weighted up), through the daemon's frontend, as one long stream. The
segments around the highest-scoring windows (any class, above `min_score`, at most a few per
stretch and never overlapping) go into a bounded first-in-first-out store; `draw` returns some of
them to replace part of each batch, labelled negative for every class in every window. The store
follows the model: what it fired on a thousand steps ago and no longer does is pushed out by what
it fires on now.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import numpy as np
import torch

from earshot.features import FrontendParams, features

try:  # run as `python tools/x.py` (tools/ on sys.path) or imported as `tools.mining`
    from augment import WINDOW_HOP, fill_background
except ImportError:  # pragma: no cover - import path depends on the entry point
    from tools.augment import WINDOW_HOP, fill_background

WindowScores = Callable[[torch.Tensor], torch.Tensor]
"""Features (1, T, n_mels) -> window scores (1, W, C) in 0..1, windows every WINDOW_HOP frames ending at T."""


class HardNegativeMiner:
    """A store of negative training segments on which the model currently scores high."""

    def __init__(
        self,
        draw_negative: Callable[[np.random.Generator], np.ndarray],
        frontend: FrontendParams,
        segment_windows: int,
        *,
        stretch_s: float = 30.0,
        min_score: float = 0.2,
        per_stretch: int = 6,
        capacity: int = 1024,
        level_dbfs: tuple[float, float] = (-55.0, -12.0),
    ):
        """`draw_negative(rng)` returns one negative recording (float32 at the frontend's rate)."""
        if segment_windows < 1 or per_stretch < 1 or capacity < 1:
            raise ValueError("segment_windows, per_stretch and capacity must be at least 1")
        self.draw_negative = draw_negative
        self.p = frontend
        self.segment_windows = segment_windows
        self.segment_frames = frontend.chunk_frames + (segment_windows - 1) * WINDOW_HOP
        self.stretch_s = stretch_s
        self.min_score = min_score
        self.per_stretch = per_stretch
        self.level_dbfs = level_dbfs
        self.store: deque[np.ndarray] = deque(maxlen=capacity)
        self.scanned_s = 0.0
        """Seconds of negative audio scanned so far."""
        self.mined = 0
        """Segments added to the store so far."""

    def mine(self, scores: WindowScores, rng: np.random.Generator) -> int:
        """Scan one fresh stretch with `scores`; return how many segments were added to the store."""
        sr, chunk = self.p.sample_rate, self.p.chunk_frames
        n = int(self.stretch_s * sr)
        x = fill_background(self.draw_negative, rng, n) * np.float32(10 ** (rng.uniform(*self.level_dbfs) / 20))
        feats = features(np.clip(x, -1.0, 1.0), self.p)
        self.scanned_s += self.stretch_s
        # Windows end every WINDOW_HOP frames, the last at the end of the trimmed stretch.
        usable = chunk + ((feats.shape[0] - chunk) // WINDOW_HOP) * WINDOW_HOP
        if usable < self.segment_frames:
            return 0
        feats = feats[feats.shape[0] - usable :]
        with torch.no_grad():
            s = scores(torch.from_numpy(np.ascontiguousarray(feats))[None])[0].max(dim=1).values.numpy()
        ends = chunk + WINDOW_HOP * np.arange(len(s))  # frame after the last of each window
        added = 0
        taken: list[int] = []
        for w in np.argsort(-s):
            if s[w] < self.min_score or added >= self.per_stretch:
                break
            # The firing window lands anywhere in the segment, so every position of the sound is taught.
            last = min(usable, int(ends[w]) + WINDOW_HOP * int(rng.integers(self.segment_windows)))
            start = last - self.segment_frames
            if start < 0:
                start, last = 0, self.segment_frames
            if any(abs(start - t) < self.segment_frames for t in taken):
                continue
            taken.append(start)
            self.store.append(np.ascontiguousarray(feats[start:last], dtype=np.float32))
            added += 1
        self.mined += added
        return added

    def draw(self, k: int, rng: np.random.Generator) -> np.ndarray | None:
        """Features (k, segment_frames, n_mels) of k stored segments, or None while the store is empty."""
        if not self.store or k <= 0:
            return None
        idx = rng.integers(len(self.store), size=k)
        return np.stack([self.store[int(i)] for i in idx])
