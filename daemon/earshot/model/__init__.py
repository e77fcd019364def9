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

from earshot.model.cascade import CascadeState
from earshot.model.scoring import MultiScorer, ScoringModel, SingleScorer
from earshot.model.spec import CheckpointError, CnnDims, default_model_path, macs_per_frame, validate_labels

if TYPE_CHECKING:
    from earshot.features import FrontendParams


def load_model(path: str | Path, frontend: FrontendParams | None = None, threads: int = 1) -> ScoringModel:
    """Load a model file by extension: `.onnx` -> ONNX Runtime (no torch), anything else -> torch checkpoint.

    `threads` is the intra-op thread count of the backend (torch.set_num_threads for torch, a
    session option for ONNX Runtime). Raises CheckpointError (one clear line) on anything wrong.
    """
    path = Path(path)
    if path.suffix.lower() == ".onnx":
        from earshot.model.onnx import load_onnx

        return load_onnx(path, frontend=frontend, threads=threads)
    try:
        import torch
    except ImportError as exc:  # an ONNX-only install
        raise CheckpointError(
            f"{path} is a torch checkpoint but torch is not installed; use an .onnx model or install torch"
        ) from exc
    from earshot.model.checkpoint import load_checkpoint

    torch.set_num_threads(threads)
    return load_checkpoint(path, frontend=frontend)


__all__ = [
    "CascadeState",
    "CheckpointError",
    "CnnDims",
    "MultiScorer",
    "ScoringModel",
    "SingleScorer",
    "default_model_path",
    "load_model",
    "macs_per_frame",
    "validate_labels",
]
