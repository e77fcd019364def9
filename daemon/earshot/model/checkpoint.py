"""Checkpoint stage: save and load a trained model with its labels, frontend, thresholds and provenance.

A checkpoint is a `torch.save` of plain types only (so `torch.load(weights_only=True)` reads
it): format tag and version, labels, frontend parameters, `CnnDims`, default thresholds,
JSON provenance and the state dict. Loading validates every part and raises
`CheckpointError` with one clear line on anything wrong.

Room to grow: an optional `sections` entry (a dict of named sections, each plain types and
tensors) carries parts that not every model has, such as a second-stage network. A checkpoint
without it loads with `sections == {}`, and `save_checkpoint` writes the key only when there is a
section, so a plain checkpoint stays readable by earshots that predate it. Each section is checked
by the module that uses it; this one checks only that it is a dict (weights_only keeps it safe).

Top of the torch side of the model package: imports `spec` and `cnn` (which imports `scoring`).
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from earshot.features import FrontendParams
from earshot.model.cnn import MultiStreamScorer, SoundEventCnn, StreamingScorer, score_windows
from earshot.model.confirm import ConfirmError, from_dict
from earshot.model.spec import CheckpointError, CnnDims, one_line, read_model_head, validate_labels

_LOGGER = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "earshot-checkpoint"
CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("format", "version", "labels", "frontend", "dims", "thresholds", "provenance", "state_dict")
_OPTIONAL_KEYS = ("sections", "confirm")
"""Keys a checkpoint may leave out; a loader treats an absent one as empty. "confirm" holds the cascade's
second stage (earshot.model.confirm), loaded as strictly as the network."""
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since torch 1.6
_PICKLE_MAGIC = b"\x80"  # torch's legacy format: a pickle (protocol 2 or later)
_ONNX_START = b"\x08"  # an ONNX ModelProto starts with its ir_version field


@dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded and validated: everything the daemon needs to score audio."""

    model: SoundEventCnn
    """The network, in eval mode."""
    dims: CnnDims
    """Its architecture."""
    labels: tuple[str, ...]
    """Class names, in output order."""
    frontend: FrontendParams
    """Frontend parameters the model was trained with."""
    thresholds: dict[str, float] = field(default_factory=dict)
    """Default decision threshold per label (probability in (0, 1))."""
    provenance: dict[str, Any] = field(default_factory=dict)
    """Free-form training metadata (data, commit, metrics), plain JSON types."""
    sections: dict[str, Any] = field(default_factory=dict)
    """Optional named extra parts of the checkpoint (plain types and tensors); empty when absent."""
    confirmer: Any = None
    """The cascade's second stage (earshot.model.confirm.Confirmer), when the checkpoint has one."""

    @property
    def backend(self) -> str:
        """Which runtime scores this model: 'torch' (see earshot.model.onnx for 'onnx')."""
        return "torch"

    def streaming_scorer(self, chunk_frames: int, hop_frames: int) -> StreamingScorer:
        """A live scorer for one stream."""
        return StreamingScorer(self.model, chunk_frames, hop_frames)

    def multi_stream_scorer(self, chunk_frames: int, hop_frames: int, n_streams: int) -> MultiStreamScorer:
        """A live scorer for `n_streams` streams sharing one forward pass per push."""
        return MultiStreamScorer(self.model, chunk_frames, hop_frames, n_streams)

    def score_windows(self, feats: np.ndarray, chunk_frames: int, hop_frames: int) -> tuple[np.ndarray, np.ndarray]:
        """Offline scores of every window of feats (T, n_mels): end_frames (N,), scores (N, C)."""
        return score_windows(self.model, feats, chunk_frames, hop_frames)


def save_checkpoint(
    path: str | Path,
    model: SoundEventCnn,
    labels: list[str] | tuple[str, ...],
    frontend: FrontendParams,
    thresholds: dict[str, float],
    provenance: dict[str, Any],
    sections: dict[str, Any] | None = None,
    confirm: Any = None,
) -> None:
    """Write a checkpoint that `load_checkpoint` accepts (validated before writing).

    `sections`: optional named extra parts (see the module docstring); written only when non-empty.
    `confirm` (an earshot.model.confirm.Confirmer) is stored as the cascade's "confirm" section.
    """
    labels = [str(x) for x in labels]
    thresholds = {str(k): float(v) for k, v in thresholds.items()}
    validate_labels(labels, thresholds, model.dims)
    try:
        # Round-trip through JSON: only plain types survive weights_only loading.
        provenance = json.loads(json.dumps(provenance))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"provenance must contain only JSON types: {exc}") from exc
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "labels": labels,
        "frontend": frontend.to_dict(),
        "dims": model.dims.to_dict(),
        "thresholds": thresholds,
        "provenance": provenance,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
    }
    if sections:
        if not isinstance(sections, dict) or not all(isinstance(k, str) and k for k in sections):
            raise CheckpointError("sections must be a dict with non-empty string keys")
        ckpt["sections"] = sections
    if confirm is not None:
        ckpt["confirm"] = confirm.to_dict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(ckpt, tmp)
    tmp.replace(path)  # atomic: a running daemon never sees a half-written file


def _expect(ckpt: dict[str, Any], key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    """Return ckpt[key] if it has the expected type, else raise CheckpointError."""
    value = ckpt[key]
    if not isinstance(value, kind):
        raise CheckpointError(f"bad checkpoint {path}: '{key}' has type {type(value).__name__}")
    return value


def _torch_reason(exc: BaseException) -> str:
    """The line of a torch.load error that says what is wrong, without torch's advice around it."""
    boiler = ("Weights only load failed", "Please file an issue", "Check the documentation")
    lines = [x.strip() for x in str(exc).splitlines() if x.strip() and not x.strip().startswith(boiler)]
    text = " ".join(lines).replace("WeightsUnpickler error:", "").strip()
    return one_line(ValueError(text.split(". ")[0])) if text else type(exc).__name__


def _check_finite(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse NaN or infinite weights and negative BatchNorm variances: either makes every score NaN."""
    for key, value in state_dict.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"bad checkpoint {path}: weight {key} holds NaN or infinite values")
        if key.endswith("running_var") and bool((value < 0).any()):
            raise CheckpointError(f"bad checkpoint {path}: {key} holds a negative variance")


def load_checkpoint(path: str | Path, frontend: FrontendParams | None = None) -> LoadedModel:
    """Load and validate a checkpoint; the model is returned in eval mode on CPU.

    Refuses anything but plain tensors and containers (`weights_only=True`), checks the
    format, every key and type, strictly loads the state dict, and, if `frontend` is given,
    that the checkpoint was trained with the same frontend parameters.
    """
    path = Path(path)
    head = read_model_head(path, "earshot checkpoint")  # missing, empty, a folder, a WAV, a text...
    if not head.startswith((_ZIP_MAGIC, _PICKLE_MAGIC)):
        hint = "; an ONNX model needs the .onnx extension" if head.startswith(_ONNX_START) else ""
        raise CheckpointError(f"{path} is not an earshot checkpoint (not a file torch.save writes{hint})")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"unsupported global:? (?:GLOBAL )?(\S+)", str(exc), re.IGNORECASE)
        if unsafe:
            raise CheckpointError(
                f"{path} is not a safe earshot checkpoint: it asks to run {unsafe.group(1)} "
                "(refusing to execute code from it)"
            ) from exc
        raise CheckpointError(f"{path} is not a readable earshot checkpoint (corrupt?): {_torch_reason(exc)}") from exc
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is not a readable earshot checkpoint (corrupt or truncated?): {_torch_reason(exc)}"
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an earshot checkpoint (format is not '{CHECKPOINT_FORMAT}')")
    if ckpt.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt.get('version')!r}; this earshot reads version {CHECKPOINT_VERSION}"
        )
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    extra = sorted(set(map(str, ckpt)) - set(_CHECKPOINT_KEYS) - set(_OPTIONAL_KEYS))
    if missing or extra:
        raise CheckpointError(f"bad checkpoint {path}: missing keys {missing}, unknown keys {extra}")
    labels = _expect(ckpt, "labels", list, path)
    if not all(isinstance(x, str) for x in labels):
        raise CheckpointError(f"bad checkpoint {path}: labels must be strings")
    thresholds = _expect(ckpt, "thresholds", dict, path)
    provenance = _expect(ckpt, "provenance", dict, path)
    sections = _expect(ckpt, "sections", dict, path) if "sections" in ckpt else {}
    state_dict = _expect(ckpt, "state_dict", dict, path)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"bad checkpoint {path}: state_dict must hold only tensors")
    try:
        dims = CnnDims.from_dict(_expect(ckpt, "dims", dict, path))
        saved_frontend = FrontendParams.from_dict(_expect(ckpt, "frontend", dict, path))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"bad checkpoint {path}: {exc}") from exc
    try:
        validate_labels(labels, thresholds, dims)
    except CheckpointError as exc:
        raise CheckpointError(f"bad checkpoint {path}: {exc}") from exc
    if dims.n_mels != saved_frontend.n_mels:
        raise CheckpointError(
            f"bad checkpoint {path}: model expects n_mels={dims.n_mels}, frontend has {saved_frontend.n_mels}"
        )
    if frontend is not None and frontend != saved_frontend:
        diffs = [
            f"checkpoint was trained with {f.name}={getattr(saved_frontend, f.name)!r}, "
            f"runtime uses {f.name}={getattr(frontend, f.name)!r}"
            for f in fields(FrontendParams)
            if getattr(saved_frontend, f.name) != getattr(frontend, f.name)
        ]
        raise CheckpointError(f"{path} does not match the runtime frontend: " + "; ".join(diffs))
    model = SoundEventCnn(dims)
    expected = set(model.state_dict())
    missing_keys = sorted(expected - set(state_dict))
    unexpected_keys = sorted(set(state_dict) - expected)
    if missing_keys or unexpected_keys:
        raise CheckpointError(
            f"bad checkpoint {path}: state_dict does not match dims: "
            f"missing keys {missing_keys}, unexpected keys {unexpected_keys}"
        )
    _check_finite(state_dict, path)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:  # shape mismatches; flatten torch's multi-line message
        detail = " ".join(str(exc).split())
        raise CheckpointError(f"bad checkpoint {path}: state_dict does not match dims: {detail}") from exc
    model.eval()
    confirmer = None
    if "confirm" in ckpt:
        try:
            confirmer = from_dict(ckpt["confirm"], list(labels))
        except ConfirmError as exc:
            raise CheckpointError(f"bad checkpoint {path}: {exc}") from exc
    _LOGGER.debug("loaded %s: labels=%s dims=%s", path, labels, dims)
    return LoadedModel(
        model=model,
        dims=dims,
        labels=tuple(labels),
        frontend=saved_frontend,
        thresholds={k: float(v) for k, v in thresholds.items()},
        provenance=provenance,
        sections=sections,
        confirmer=confirmer,
    )

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_VERSION",
    "CheckpointError",
    "LoadedModel",
    "load_checkpoint",
    "save_checkpoint",
]
