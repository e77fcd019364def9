"""Model stage: what scores a window of log-mel frames, and how it is loaded from a file.

One concern per module, imported in one direction only (a test checks it):

    spec        CnnDims, CheckpointError, label checks, default_model_path (no torch)
    scoring     ScoringModel protocol, numpy StepScorer, pooling (no torch; imports spec)
    cnn         the torch network SoundEventCnn and its scorers (imports spec, scoring)
    checkpoint  save/load the self-describing .pt checkpoint (imports spec, cnn)
    onnx        export to .onnx and the ONNX Runtime model (imports spec, scoring; torch only to export)
    mn          EfficientAT's MobileNetV3 audio tagger (mn04) and its input features
    confirm     the cascade's second stage: mn04 + a head, loaded from the checkpoint's "confirm" section
    cascade     per-stream cascade bookkeeping between stage-1 scores and the confirmer (no torch)

The analyzers and the service see a loaded model only through `ScoringModel`, so another
network plugs in as one more module here plus a branch in `load_model`. This file imports only
the torch-free modules: `import earshot.model` never loads torch; `load_model` imports the
backend a file needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from earshot.model.cascade import CascadeState
from earshot.model.scoring import MultiScorer, ScoringModel, SingleScorer
from earshot.model.spec import CheckpointError, CnnDims, default_model_path, macs_per_frame, validate_labels

if TYPE_CHECKING:
    from earshot.features import FrontendParams


def load_model(path: str | Path, frontend: FrontendParams | None = None, threads: int = 1) -> ScoringModel:
    """Load a model file by extension: `.onnx` -> ONNX Runtime (no torch), anything else -> torch checkpoint.

    `threads` is the intra-op thread count of the backend (torch.set_num_threads for torch, a
    session option for ONNX Runtime). Raises CheckpointError (one clear line) on anything wrong,
    including a model that scores NaN: whatever passes here scores the first hop as it will the rest.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from earshot.model.onnx import load_onnx

        return check_scores(load_onnx(path, frontend=frontend, threads=threads), path)
    try:
        import torch
    except ImportError as exc:  # an ONNX-only install
        raise CheckpointError(
            f"{path} is a torch checkpoint but torch is not installed; use an .onnx model or install torch"
        ) from exc
    from earshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    return check_scores(load_checkpoint(path, frontend=frontend), path)


def check_scores(model: ScoringModel, path: Path) -> ScoringModel:
    """`model`, once one window of random frames gives one probability in [0, 1] per label; else CheckpointError.

    Backend-neutral (any network behind `ScoringModel`), and cheap: one window, a few ms.
    """
    p = model.frontend
    feats = np.random.default_rng(0).standard_normal((p.chunk_frames, p.n_mels)).astype(np.float32)
    try:
        _, scores = model.score_windows(feats, p.chunk_frames, max(1, p.chunk_frames // 10))
    except ValueError as exc:  # a window shorter than the network's receptive field, a frame-size mismatch
        raise CheckpointError(f"bad model {path}: it cannot score its own frontend's window: {exc}") from exc
    scores = np.asarray(scores)
    if scores.shape != (1, len(model.labels)):
        raise CheckpointError(f"bad model {path}: one window gave scores of shape {scores.shape}, "
                              f"expected (1, {len(model.labels)}) for labels {list(model.labels)}")
    if not (np.isfinite(scores).all() and ((scores >= 0) & (scores <= 1)).all()):
        raise CheckpointError(f"bad model {path}: it gives NaN or out-of-range scores ({scores[0].tolist()})")
    return model


__all__ = [
    "CascadeState",
    "CheckpointError",
    "CnnDims",
    "MultiScorer",
    "ScoringModel",
    "SingleScorer",
    "check_scores",
    "default_model_path",
    "load_model",
    "macs_per_frame",
    "validate_labels",
]
