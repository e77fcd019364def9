"""Backend-neutral scoring: what every loaded model offers the analyzers, and the numpy step scorer.

The analyzers and the service talk to a model only through `ScoringModel` (labels, frontend,
thresholds, provenance and three scorer factories), so a new backbone plugs in by offering
those, without touching them. Both of today's backends score the same network with the same numbers:

- torch (`.pt` checkpoints, `earshot.model.checkpoint.load_checkpoint`): the training format;
- ONNX Runtime (`.onnx` files, `earshot.model.onnx.load_onnx`): no torch import at all,
  about half the daemon's memory (see tools/bench.py).

Both run the network as a *streaming step*: new frames (B, n, n_mels) plus each conv layer's
cached input columns in, per-frame (logit | attention) rows (B, n, 2C) plus the updated caches
out. Caches start as zeros; an output row is kept only once its receptive field lies entirely
in real frames (frame index >= R - 1), so zero caches never reach a score. `StepScorer` does the
bookkeeping (caches, per-stream history, pooling over the window) in numpy for any number of
streams, stacking streams with the same number of new frames into one batched step call.

This module must not import torch; inside the package it imports only `spec`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np

from earshot.features import FrontendParams
from earshot.model.spec import CnnDims, check_features, no_windows

StepFn = Callable[[np.ndarray, list[np.ndarray]], tuple[np.ndarray, list[np.ndarray]]]
"""frames (B, n, n_mels) float32, caches [(B, C_i, F_i, ctx_i)] -> rows (B, n, 2C), new caches."""


class SingleScorer(Protocol):
    """One stream: `push(frames (n, n_mels)) -> [(end_frame, scores (C,))]`, `reset()`."""

    def push(self, frames: np.ndarray) -> list[tuple[int, np.ndarray]]: ...

    def reset(self) -> None: ...


class MultiScorer(Protocol):
    """Many streams: `push([frames_i (n_i, n_mels)]) -> [[(end_frame, scores (C,))] per stream]`."""

    def push(self, frames_per_stream: Sequence[np.ndarray]) -> list[list[tuple[int, np.ndarray]]]: ...

    def reset(self, i: int) -> None: ...

    def rearrange(self, keep: Sequence[int | None]) -> None: ...


class ScoringModel(Protocol):
    """What the analyzers and the service need from a loaded model, whatever its network or runtime.

    Scores are sigmoid probabilities (C,) in label order, one per window of `chunk_frames`
    frames ending every `hop_frames` frames; live and offline scorers give the same numbers.
    """

    labels: tuple[str, ...]
    frontend: FrontendParams
    thresholds: dict[str, float]
    provenance: dict[str, Any]

    @property
    def backend(self) -> str:
        """Which runtime scores it: 'torch' or 'onnx' (a name for logs and metrics)."""

    def streaming_scorer(self, chunk_frames: int, hop_frames: int) -> SingleScorer:
        """A live scorer for one stream (same contract as `earshot.model.cnn.StreamingScorer`)."""

    def multi_stream_scorer(self, chunk_frames: int, hop_frames: int, n_streams: int) -> MultiScorer:
        """A live scorer for `n_streams` streams batched into one forward pass per push."""

    def score_windows(self, feats: np.ndarray, chunk_frames: int, hop_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Offline scores of every window: end_frames (N,), scores (N, C) (same as the live path)."""


def check_window(dims: CnnDims, chunk_frames: int, hop_frames: int) -> int:
    """Validate window/hop against the network; return L, the frame positions per window."""
    r = dims.receptive_frames
    if chunk_frames < r:
        raise ValueError(f"chunk_frames={chunk_frames} is shorter than the receptive field R={r}")
    if hop_frames <= 0:
        raise ValueError(f"hop_frames must be positive, got {hop_frames}")
    return chunk_frames - r + 1


def cache_shapes(dims: CnnDims) -> list[tuple[int, int, int]]:
    """(channels, freq bins, columns) of each conv layer's input cache, per stream."""
    cins = (1,) + dims.channels[:-1]
    return [
        (c, f, (k - 1) * d)
        for c, f, k, d in zip(cins, dims.freq_sizes[:-1], dims.time_kernels, dims.dilations)
    ]


def pool_scores(rows: np.ndarray, n_classes: int) -> np.ndarray:
    """Sigmoid of attention pooling: rows (..., L, 2C) logit|att -> probabilities (..., C) float32."""
    logits, att = rows[..., :n_classes], rows[..., n_classes:]
    att = att - att.max(axis=-2, keepdims=True)  # softmax over frames, overflow-safe
    w = np.exp(att)
    pooled = (w * logits).sum(axis=-2) / w.sum(axis=-2)
    return (1.0 / (1.0 + np.exp(-pooled))).astype(np.float32)


class StepScorer:
    """Live scoring of `n_streams` streams through a streaming step function.

    `push([frames_0, ..., frames_{n-1}])` takes one (T_i, n_mels) block per stream (T_i may be 0)
    and returns per stream what an independent `StreamingScorer` would: one `(end_frame, scores)`
    each time that stream's frame count reaches `chunk_frames + k * hop_frames`. Streams that
    received the same number of frames share one step call (stacked on the batch axis), so at a
    common hop all live streams cost one forward pass per layer. Not thread-safe.
    """

    def __init__(self, step: StepFn, dims: CnnDims, chunk_frames: int, hop_frames: int, n_streams: int) -> None:
        if n_streams < 1:
            raise ValueError(f"n_streams must be at least 1, got {n_streams}")
        self.chunk_frames = chunk_frames
        self.hop_frames = hop_frames
        self.n_positions = check_window(dims, chunk_frames, hop_frames)
        self.n_streams = n_streams
        self._step = step
        self._dims = dims
        self._shapes = cache_shapes(dims)
        self._caches = [np.zeros((n_streams, *s), dtype=np.float32) for s in self._shapes]
        self._hist: list[np.ndarray] = [self._empty_hist()] * n_streams
        self.frames_seen = np.zeros(n_streams, dtype=np.int64)

    def _empty_hist(self) -> np.ndarray:
        return np.zeros((0, 2 * self._dims.n_classes), dtype=np.float32)

    def reset(self, i: int) -> None:
        """Forget stream i's context (its source restarted)."""
        for c in self._caches:
            c[i] = 0.0
        self._hist[i] = self._empty_hist()
        self.frames_seen[i] = 0

    def rearrange(self, keep: Sequence[int | None]) -> None:
        """New stream slots: slot j continues old slot keep[j], or starts fresh where keep[j] is None.

        Sources added or removed at run time leave the others' context intact.
        """
        old_caches, old_hist, old_seen = self._caches, self._hist, self.frames_seen
        self.n_streams = len(keep)
        self._caches = [np.zeros((self.n_streams, *s), dtype=np.float32) for s in self._shapes]
        self._hist = [self._empty_hist()] * self.n_streams
        self.frames_seen = np.zeros(self.n_streams, dtype=np.int64)
        for j, i in enumerate(keep):
            if i is not None:
                for new, old in zip(self._caches, old_caches):
                    new[j] = old[i]
                self._hist[j], self.frames_seen[j] = old_hist[i], old_seen[i]

    def push(self, frames_per_stream: Sequence[np.ndarray]) -> list[list[tuple[int, np.ndarray]]]:
        """Add one block of (T_i, n_mels) frames per stream; return each stream's completed windows."""
        if len(frames_per_stream) != self.n_streams:
            raise ValueError(f"expected {self.n_streams} frame blocks, got {len(frames_per_stream)}")
        n_mels = self._dims.n_mels
        blocks = [np.asarray(f, dtype=np.float32) for f in frames_per_stream]
        groups: dict[int, list[int]] = {}
        for i, f in enumerate(blocks):
            if f.ndim != 2 or f.shape[1] != n_mels:
                raise ValueError(f"stream {i}: expected frames of shape (n, {n_mels}), got {f.shape}")
            if f.shape[0]:
                groups.setdefault(f.shape[0], []).append(i)
        results: list[list[tuple[int, np.ndarray]]] = [[] for _ in blocks]
        for n, idx in groups.items():
            rows = self._run(idx, np.stack([blocks[i] for i in idx]))  # (B, n, 2C)
            for b, i in enumerate(idx):
                results[i] = self._advance(i, n, rows[b])
        return results

    def _run(self, idx: list[int], x: np.ndarray) -> np.ndarray:
        """One step for the streams idx (frames x (B, n, n_mels)); updates their caches."""
        if len(idx) == self.n_streams and idx == list(range(self.n_streams)):
            rows, new = self._step(x, self._caches)  # everyone, in order: no gather/scatter
            self._caches = [np.ascontiguousarray(c, dtype=np.float32) for c in new]
            return rows
        sel = np.asarray(idx)
        rows, new = self._step(x, [c[sel] for c in self._caches])
        for c, nc in zip(self._caches, new):
            c[sel] = nc
        return rows

    def _advance(self, i: int, n: int, rows: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Append stream i's valid per-frame rows (n new frames) and pool the windows completed."""
        start = int(self.frames_seen[i])
        seen = start + n
        self.frames_seen[i] = seen
        first_valid = self._dims.receptive_frames - 1  # frame index of the first full receptive field
        if seen <= first_valid:
            return []
        rows = rows[max(0, first_valid - start):]
        hist = np.concatenate((self._hist[i], rows)) if len(self._hist[i]) else rows
        t, hop, big_l = self.chunk_frames, self.hop_frames, self.n_positions
        first_k = max(0, -(-(start + 1 - t) // hop))  # smallest k with t + k*hop > start
        ends = range(t + first_k * hop, seen + 1, hop)
        out: list[tuple[int, np.ndarray]] = []
        if len(ends):
            # Row j of hist is the position ending at frame index seen - len(hist) + j; a window
            # ending at E (frame count) pools the L positions ending at indices E-L .. E-1.
            base = seen - len(hist)
            sel = np.stack([hist[e - big_l - base: e - base] for e in ends])  # (W, L, 2C)
            scores = pool_scores(sel, self._dims.n_classes)
            out = [(e, scores[k]) for k, e in enumerate(ends)]
        self._hist[i] = hist[-big_l:].copy() if len(hist) > big_l else hist
        return out


class SingleStepScorer:
    """One stream through a `StepScorer`, with `StreamingScorer`'s interface."""

    def __init__(self, step: StepFn, dims: CnnDims, chunk_frames: int, hop_frames: int) -> None:
        self._multi = StepScorer(step, dims, chunk_frames, hop_frames, 1)
        self.chunk_frames = chunk_frames
        self.hop_frames = hop_frames
        self.n_positions = self._multi.n_positions

    @property
    def frames_seen(self) -> int:
        """Frames pushed since the last reset."""
        return int(self._multi.frames_seen[0])

    def reset(self) -> None:
        """Forget all context (start of a new stream)."""
        self._multi.reset(0)

    def push(self, frames: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add (n, n_mels) feature frames; return the windows completed, oldest first."""
        return self._multi.push([frames])[0]


def step_score_windows(
    step: StepFn, dims: CnnDims, feats: np.ndarray, chunk_frames: int, hop_frames: int, segment_frames: int = 1024
) -> tuple[np.ndarray, np.ndarray]:
    """Offline scores through a step function: the file streamed in big segments, windows pooled at once."""
    big_l = check_window(dims, chunk_frames, hop_frames)
    feats = check_features(feats, dims)
    total = feats.shape[0]
    if total < chunk_frames:
        return no_windows(dims)
    caches = [np.zeros((1, *s), dtype=np.float32) for s in cache_shapes(dims)]
    parts = []
    for s in range(0, total, max(1, segment_frames)):
        rows, caches = step(feats[None, s: s + segment_frames], caches)
        parts.append(rows[0])
    per_frame = np.concatenate(parts)[dims.receptive_frames - 1:]  # (T - R + 1, 2C)
    n_windows = (total - chunk_frames) // hop_frames + 1
    starts = hop_frames * np.arange(n_windows)
    windows = np.lib.stride_tricks.sliding_window_view(per_frame, big_l, axis=0)[starts]  # (N, 2C, L)
    scores = pool_scores(windows.transpose(0, 2, 1), dims.n_classes)
    ends = chunk_frames + hop_frames * np.arange(n_windows, dtype=np.int64)
    return ends, scores


__all__ = [
    "MultiScorer",
    "ScoringModel",
    "SingleScorer",
    "SingleStepScorer",
    "StepFn",
    "StepScorer",
    "cache_shapes",
    "check_window",
    "pool_scores",
    "step_score_windows",
]
