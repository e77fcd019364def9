"""Distillation of EfficientAT's AudioSet tagger into the streaming CNN while it trains.

The streaming CNN learns the three classes from a few hours of recordings, and on sources it has
never heard it keeps the cues of the sources it knows (their microphones, rooms, editing). mn04 was
trained on AudioSet's two million clips and tells a jackhammer from a gunshot and a siren from a
scream in rooms it has never heard, but costs ~6x the streaming CNN per hop. Here the student learns
both: the labels of every window, and, for one window of every training segment, the teacher's 527
AudioSet tag probabilities on the same second of audio (Hinton's soft targets; binary cross-entropy
per tag, as EfficientAT itself was distilled). A linear `TagHead` on the student's window embedding
predicts the tags; it only shapes the embedding during training and is not part of the checkpoint,
so the shipped model keeps its size, cost and 0.1 s hop.

The teacher runs in the example worker beside the mixer (`TeacherSegments`), on the clean mixture
(before SpecAugment, which only the student's features get); ~2.5 ms per window on one core with
ONNX Runtime. Mined hard negatives (`tools/mining.py`) carry no tags and are left out of this loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

try:  # run as `python tools/x.py` (tools/ on sys.path) or imported as `tools.distill`
    from augment import Example, Mixer
    from train_confirm import TaggerEmbedder, load_tagger, window_audio
except ImportError:  # pragma: no cover - import path depends on the entry point
    from tools.augment import Example, Mixer
    from tools.train_confirm import TaggerEmbedder, load_tagger, window_audio

N_TAGS = 527
"""AudioSet classes of the teacher's output."""

DistillExample = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]
"""(segment features, targets, masks, teacher tag probabilities (N_TAGS,), index of the tagged window)."""


class TagTeacher:
    """mn04 (frozen, AudioSet-pretrained) tag probabilities (N_TAGS,) of a 1 s window of 16 kHz audio.

    The network and its ONNX Runtime session are built on first use, in the process that uses them
    (a DataLoader worker): a session made before the fork would be shared by the worker.
    """

    def __init__(self, pretrained: str | Path):
        self.pretrained = str(pretrained)
        self._embedder = None

    def check(self) -> None:
        """Raise ValueError (one line) unless the pretrained weights load strictly into mn04."""
        load_tagger(self.pretrained)

    def __call__(self, window: np.ndarray) -> np.ndarray:
        if self._embedder is None:
            self._embedder = TaggerEmbedder(self.pretrained, threads=1)
        logits = self._embedder([window])[0, -N_TAGS:].astype(np.float64)
        return (1.0 / (1.0 + np.exp(-logits))).astype(np.float32)


class TeacherSegments:
    """`make_examples` for `train.train`: the mixer's segments, each with the teacher's tags of one window."""

    def __init__(self, mixer: Mixer, teacher):
        """`teacher(window)` maps 1 s of 16 kHz audio to tag probabilities (N_TAGS,)."""
        self.mixer = mixer
        self.teacher = teacher

    def __call__(self, rng: np.random.Generator) -> list[DistillExample]:
        mix, placed, end0 = self.mixer.mixture(rng)
        (x, y, m), ends = self.mixer.segment_of(mix, placed, end0, rng)
        k = int(rng.integers(len(ends)))
        tags = np.asarray(self.teacher(window_audio(mix, int(ends[k]), self.mixer.p)), dtype=np.float32)
        return [(x, y, m, tags, np.int64(k))]


class TagHead(nn.Module):
    """The student's window embedding (mean of its frame embeddings) -> teacher tag logits. Training only."""

    def __init__(self, embed_dim: int, n_tags: int = N_TAGS):
        super().__init__()
        self.linear = nn.Linear(embed_dim, n_tags)
        nn.init.constant_(self.linear.bias, -4.0)  # most tags are absent from most windows

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.linear(emb)


@dataclass
class Distillation:
    """What `train.train` needs to distil: the tag head (trained with the model) and the loss weight."""

    head: TagHead
    weight: float = 10.0
    """Weight of the tag loss (mean binary cross-entropy over N_TAGS) beside the label loss (mean over
    window x class): the tags' loss is small per tag, most being near 0."""


def window_embeddings(emb: torch.Tensor, k: torch.Tensor, positions: int, hop: int) -> torch.Tensor:
    """Mean of the `positions` frame embeddings of window k[b] of each segment: (B, L, D) -> (B, D).

    Window k of a segment pools positions [k * hop, k * hop + positions), as `train.window_logits` does.
    """
    idx = k.view(-1, 1) * hop + torch.arange(positions, device=emb.device).view(1, -1)  # (B, positions)
    sel = emb.gather(1, idx.unsqueeze(-1).expand(-1, -1, emb.shape[2]))  # (B, positions, D)
    return sel.mean(dim=1)


def distill_loss(head: TagHead, emb: torch.Tensor, tags: torch.Tensor, k: torch.Tensor, valid: torch.Tensor,
                 positions: int, hop: int) -> torch.Tensor:
    """Mean over valid segments of the mean binary cross-entropy between the head's tags and the teacher's."""
    logits = head(window_embeddings(emb, k, positions, hop))
    loss = nn.functional.binary_cross_entropy_with_logits(logits, tags, reduction="none").mean(dim=1)  # (B,)
    return (loss * valid).sum() / valid.sum().clamp_min(1.0)


__all__ = ["N_TAGS", "Distillation", "DistillExample", "Example", "TagHead", "TagTeacher", "TeacherSegments",
           "distill_loss", "window_embeddings"]
