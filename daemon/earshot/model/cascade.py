"""Per-stream cascade bookkeeping between stage 1's scores and the confirmer (numpy only, no torch).

See earshot.model.confirm for what the cascade is. For each hop: classes whose stage-1 score reaches their
trigger take the confirmer's score instead; a confirmation is reused for `reuse_hops` hops while its
class stays triggered, and forgotten as soon as the class drops below its trigger.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_NEVER = 1 << 30


class CascadeState:
    """Per-stream cascade bookkeeping: the last confirmation per class and how long it stands."""

    def __init__(self, confirmer: Any):
        self.c = confirmer
        n = len(confirmer.labels)
        self.last = np.zeros(n, dtype=np.float32)
        self.age = np.full(n, _NEVER, dtype=np.int64)

    def reset(self) -> None:
        self.last[:] = 0.0
        self.age[:] = _NEVER

    def apply(self, scores: np.ndarray, window: Callable[[], np.ndarray]) -> np.ndarray:
        """Stage-1 scores (C,) -> cascade scores; `window()` returns the audio to confirm on demand."""
        triggered = scores >= self.c.trigger_array
        self.age += 1
        if not triggered.any():
            self.age[:] = _NEVER  # an untriggered hop ends every standing confirmation
            return scores
        self.age[~triggered] = _NEVER
        if (self.age[triggered] >= self.c.reuse_hops).any():
            self.last = self.c.score(window())
            self.age[:] = 0
        out = scores.copy()
        out[triggered] = self.last[triggered]
        return out
