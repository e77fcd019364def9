"""Per-stream cascade bookkeeping between stage 1's scores and the confirmer (numpy only, no torch).

See earshot.model.confirm for what the cascade is. For each hop: classes whose stage-1 score reaches their
trigger take the confirmer's score instead; a confirmation is reused for `reuse_hops` hops while its
class stays triggered, and forgotten as soon as the class drops below its trigger. A class without a
trigger is never confirmed: stage 1 alone decides it (where the confirmer does worse, e.g. gunshots).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

_NEVER = 1 << 30


def triggers_problem(triggers: Any, labels: list[str]) -> str | None:
    """Why `triggers` (label -> stage-1 score that asks the confirmer) is unusable, or None: it must
    give one or more of `labels` (the confirmed classes) a value in (0, 1)."""
    if not isinstance(triggers, dict) or not triggers or not set(triggers) <= set(labels):
        return f"triggers must give one or more of {labels} a value in (0, 1)"
    if not all(isinstance(v, (int, float)) and 0.0 < float(v) < 1.0 for v in triggers.values()):
        return f"triggers must each be in (0, 1), got {triggers}"
    return None


def trigger_array(triggers: dict[str, float], labels: list[str]) -> np.ndarray:
    """Per-label triggers (C,) float32; infinity for a class that is never confirmed."""
    return np.array([triggers.get(label, np.inf) for label in labels], dtype=np.float32)


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
