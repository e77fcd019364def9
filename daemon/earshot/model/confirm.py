"""Second stage of the detector: a pretrained audio tagger confirms what the streaming CNN proposes.

The streaming CNN (stage 1) is cheap enough to score every hop of every stream but has learnt from a
few hours of recordings; on sounds it has never heard (machinery, a new room, a new microphone) it
both misses and cries wolf. EfficientAT's mn04, trained on AudioSet's two million clips, knows far
more everyday sounds but costs ~13 M multiply-adds per second of audio per call. The cascade runs
it only where stage 1 crosses a low per-class *trigger*: then the confirmer scores the last
`window_s` of audio, and for the triggered classes its score replaces stage 1's. Below the trigger
stage 1's own (low) score stands, so the decision thresholds apply to one score per class that the
monitor, the score feed and the event state machine all see. A confirmation is reused for
`reuse_hops` hops while the class stays triggered, which bounds the cost during long sounds.

The checkpoint carries the confirmer in its optional "confirm" section (`to_dict` / `from_dict`):
the tagger's dims and weights, the head, the triggers; it is loaded as strictly as stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from .cascade import trigger_array, triggers_problem
from .mn import MnDims, MobileNetTagger
from .mnfeatures import MnFeatures

CONFIRM_VERSION = 1


class ConfirmError(ValueError):
    """The checkpoint's confirm section is malformed (one clear line)."""


class ConfirmHead(nn.Module):
    """[tagger embedding | 527 tag logits] -> class logits: normalised, then linear (`hidden` = 0, the
    default: a logistic regression on what AudioSet taught the tagger) or a two-layer MLP."""

    def __init__(self, in_dim: int, hidden: int, n_classes: int):
        super().__init__()
        self.register_buffer("shift", torch.zeros(in_dim))
        self.register_buffer("scale", torch.ones(in_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(0.3), nn.Linear(hidden, n_classes))
        else:
            self.net = nn.Sequential(nn.Dropout(0.2), nn.Linear(in_dim, n_classes))
        self.in_dim, self.hidden, self.n_classes = in_dim, hidden, n_classes

    def set_normalization(self, shift: torch.Tensor, scale: torch.Tensor) -> None:
        self.shift.copy_(shift)
        self.scale.copy_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.shift) / self.scale)


@dataclass
class Confirmer:
    """mn04 + head over the last `window_s` of a stream's audio: class probabilities (C,)."""

    tagger: MobileNetTagger
    head: ConfirmHead
    labels: list[str]
    triggers: dict[str, float]
    """Stage-1 score (per class) at or above which the confirmer is asked; a class left out is never
    confirmed."""
    window_s: float = 1.0
    reuse_hops: int = 2
    """A confirmation stands for this many hops while its class stays triggered."""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tagger.eval()
        self.head.eval()
        self.features = MnFeatures()
        self.trigger_array = trigger_array(self.triggers, self.labels)
        self.calls = 0

    def set_triggers(self, triggers: dict[str, float]) -> None:
        """New per-class triggers (each in (0, 1), for the confirmed classes), e.g. chosen by calibration
        for a CPU budget."""
        if problem := triggers_problem(triggers, self.labels):
            raise ValueError(problem)
        self.triggers = {k: float(v) for k, v in triggers.items()}
        self.trigger_array = trigger_array(self.triggers, self.labels)

    def score(self, window: np.ndarray) -> np.ndarray:
        """Probabilities (C,) for one window of 16 kHz audio (any length >= 0.1 s)."""
        mel = torch.from_numpy(self.features(window)[None, None])
        with torch.inference_mode():
            logits, emb = self.tagger(mel)
            out = torch.sigmoid(self.head(torch.cat([emb, logits], dim=1)))[0].numpy()
        self.calls += 1
        return np.nan_to_num(out.astype(np.float32), nan=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CONFIRM_VERSION,
            "labels": list(self.labels),
            "triggers": {k: float(v) for k, v in self.triggers.items()},
            "window_s": float(self.window_s),
            "reuse_hops": int(self.reuse_hops),
            "tagger_dims": self.tagger.dims.to_dict(),
            "tagger": {k: v.detach().cpu().clone() for k, v in self.tagger.state_dict().items()},
            "head_dims": {"in_dim": self.head.in_dim, "hidden": self.head.hidden, "n_classes": self.head.n_classes},
            "head": {k: v.detach().cpu().clone() for k, v in self.head.state_dict().items()},
            "provenance": self.provenance,
        }


def _finite_weights(state: dict[str, Any], what: str) -> None:
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise ConfirmError(f"confirm section: {what} entry {k} is not a tensor")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ConfirmError(f"confirm section: {what} weight {k} holds NaN or infinite values")


def from_dict(d: Any, labels: list[str]) -> Confirmer:
    """Rebuild a Confirmer from a checkpoint's confirm section; ConfirmError on anything wrong."""
    if not isinstance(d, dict) or d.get("version") != CONFIRM_VERSION:
        raise ConfirmError(f"confirm section: expected version {CONFIRM_VERSION}")
    if list(d.get("labels", [])) != list(labels):
        raise ConfirmError(f"confirm section: labels {d.get('labels')} differ from the model's {labels}")
    triggers = d.get("triggers")
    if problem := triggers_problem(triggers, list(labels)):
        raise ConfirmError(f"confirm section: {problem}")
    try:
        tdims = MnDims(**d["tagger_dims"])
        hd = d["head_dims"]
        if not (0 < tdims.width <= 2 and 0 < tdims.n_mels <= 256 and 0 < tdims.n_classes <= 10000
                and 0 <= int(hd["hidden"]) <= 4096 and hd["n_classes"] == len(labels)):
            raise ConfirmError(f"confirm section: implausible dims {d['tagger_dims']} / {hd}")
        window_s, reuse = float(d["window_s"]), int(d["reuse_hops"])
        if not (0.2 <= window_s <= 10.0 and 1 <= reuse <= 100):
            raise ConfirmError(f"confirm section: window_s {window_s} or reuse_hops {reuse} out of range")
        _finite_weights(d["tagger"], "tagger")
        _finite_weights(d["head"], "head")
        tagger = MobileNetTagger(tdims)
        tagger.load_state_dict(d["tagger"], strict=True)
        head = ConfirmHead(int(hd["in_dim"]), int(hd["hidden"]), int(hd["n_classes"]))
        if head.in_dim != tagger.embed_dim + tdims.n_classes:
            raise ConfirmError(f"confirm section: head takes {head.in_dim} inputs, tagger gives "
                               f"{tagger.embed_dim + tdims.n_classes}")
        head.load_state_dict(d["head"], strict=True)
    except (KeyError, TypeError, RuntimeError) as exc:
        raise ConfirmError(f"confirm section: {' '.join(str(exc).split())[:300]}") from exc
    return Confirmer(tagger, head, list(labels), {k: float(v) for k, v in triggers.items()}, window_s, reuse,
                     dict(d.get("provenance") or {}))
