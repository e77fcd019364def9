"""Demo source: synthetic scenes with alarms, gunshots and glass breaks, for machines without a microphone."""

from __future__ import annotations

import collections
import logging

from .base import Capture, _Pacer

_LOGGER = logging.getLogger(__name__)


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
        from .. import synth  # here, not at import: it needs scipy.signal, which a daemon without a demo need not load

        sr = self.samplerate
        block = self.cfg.block_samples(sr)
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
