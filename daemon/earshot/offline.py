"""Detection on recordings (`earshot detect`, evaluation), through the daemon's own analyzers."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from .analyzer import BatchAnalyzer, Hop
from .config import DetectConfig, FrontendConfig
from .events import END, Event
from .model import ScoringModel as LoadedModel

BLOCK_S = 30.0
"""Audio scored per batch (s): large enough for fast batched inference, small enough for bounded memory."""


@dataclass(frozen=True)
class Detection:
    """A finished detection in a file, as `earshot detect` prints it."""

    file: str
    label: str
    onset: float
    """Seconds from the start of the file."""
    offset: float
    """Seconds from the start of the file."""
    score: float

    def to_dict(self) -> dict:
        return {"file": self.file, "label": self.label, "onset": self.onset, "offset": self.offset,
                "score": self.score}

    def to_dcase(self) -> str:
        """DCASE format: file, onset, offset, label separated by tabs."""
        return f"{self.file}\t{self.onset:.3f}\t{self.offset:.3f}\t{self.label}"


def _analyzer(loaded: LoadedModel, frontend: FrontendConfig | None, detect: DetectConfig | None, source: str,
              node: str, hops: list[Hop] | None) -> BatchAnalyzer:
    started = time.time()
    frontend = frontend or FrontendConfig(chunk_size=loaded.frontend.chunk_s)
    return BatchAnalyzer(loaded, frontend, detect or DetectConfig(), source=source, node=node,
                         to_wall=lambda t: started + t, on_hop=None if hops is None else hops.append)


def detect_blocks(blocks: Iterable[np.ndarray], loaded: LoadedModel, detect: DetectConfig | None = None,
                  frontend: FrontendConfig | None = None, source: str = "file", node: str = "offline",
                  hops: list[Hop] | None = None) -> list[Event]:
    """Run detection over audio blocks (float32 mono at the model rate); returns start and end events.

    If `hops` is a list, every hop's scores and level are appended to it.
    """
    analyzer = _analyzer(loaded, frontend, detect, source, node, hops)
    events: list[Event] = []
    for block in blocks:
        events += analyzer.push(block)
    return events + analyzer.finish()


def detect_samples(samples: np.ndarray, loaded: LoadedModel, detect: DetectConfig | None = None,
                   frontend: FrontendConfig | None = None, source: str = "file", node: str = "offline",
                   hops: list[Hop] | None = None) -> list[Event]:
    """Run detection over a whole signal held in memory (float32 mono at the model rate)."""
    step = int(BLOCK_S * loaded.frontend.sample_rate)
    blocks = (samples[i:i + step] for i in range(0, len(samples), step))
    return detect_blocks(blocks, loaded, detect, frontend, source, node, hops)


def score_samples(samples: np.ndarray, loaded: LoadedModel, frontend: FrontendConfig | None = None,
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-hop window end times (s), class scores (N, C) and levels (dBFS) for a whole signal."""
    hops: list[Hop] = []
    detect_samples(samples, loaded, DetectConfig(min_level_dbfs=-1000.0), frontend, hops=hops)
    n = len(loaded.labels)
    times = np.array([h.t_end for h in hops], dtype=np.float64)
    scores = np.stack([h.scores for h in hops]) if hops else np.zeros((0, n), dtype=np.float32)
    levels = np.array([h.level_dbfs for h in hops], dtype=np.float64)
    return times, scores, levels


def detections(file: str, events: list[Event]) -> list[Detection]:
    """The finished detections (one per start/end pair) in onset order."""
    found = [Detection(file, e.label, e.onset, float(e.offset or e.onset), e.score) for e in events if e.type == END]
    return sorted(found, key=lambda d: (d.onset, d.label))
