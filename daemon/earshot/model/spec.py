"""Torch-free description of an earshot model: architecture dims, label checks, model errors.

The bottom of the model package (`spec <- scoring <- cnn <- checkpoint`, `onnx` beside them):
everything here is needed by every backend (torch checkpoints and ONNX files alike), so it
imports nothing from the package and must not import torch: a daemon that runs an .onnx model
never loads torch (about 290 MB of RSS).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np


MAX_VALUES = {
    "n_mels": 512,
    "channels": 1024,
    "freq_strides": 8,
    "time_kernels": 15,
    "dilations": 512,
    "freq_kernel": 15,
    "embed_dim": 4096,
    "n_classes": 1000,
}
"""Largest value of each CnnDims field: far above any network earshot would run, small enough that a
checkpoint with absurd dims is refused before its network is built (no multi-GB allocation)."""
MAX_LAYERS = 16
"""Most conv layers a CnnDims may have."""
MAX_RECEPTIVE_FRAMES = 2000
"""Longest receptive field (frames, 20 s at 10 ms) a CnnDims may have."""
MAX_PARAMETERS = 20_000_000
"""Most numbers (weights and BatchNorm statistics) a network may hold: 80 MB of float32, 8x the budget."""


@dataclass(frozen=True)
class CnnDims:
    """Architecture of `SoundEventCnn`; stored in the checkpoint (tuples as lists)."""

    n_mels: int = 64
    """Mel bands per input frame (must equal the frontend's n_mels)."""
    channels: tuple[int, ...] = (16, 24, 32, 48, 64)
    """Output channels of each conv layer."""
    freq_strides: tuple[int, ...] = (2, 2, 2, 2, 2)
    """Stride over frequency of each conv layer (mel bins)."""
    time_kernels: tuple[int, ...] = (3, 3, 3, 3, 3)
    """Kernel size over time of each conv layer (frames)."""
    dilations: tuple[int, ...] = (1, 2, 4, 8, 16)
    """Dilation over time of each conv layer (frames): 1-2-4-8-16 gives each frame embedding 0.63 s of
    context (a siren's sweep, a T3 beep and its gap) for one extra layer on 2 frequency bins."""
    freq_kernel: int = 3
    """Kernel size over frequency of every conv layer (mel bins), odd; 'same' padding."""
    embed_dim: int = 64
    """Per-frame embedding size."""
    n_classes: int = 3
    """Number of output classes (labels)."""
    dropout: float = 0.2
    """Dropout on the per-frame embedding during training (probability)."""

    def __post_init__(self) -> None:
        # Checkpoints store tuples as lists; normalise so equality and hashing work.
        for name in ("channels", "freq_strides", "time_kernels", "dilations"):
            value = getattr(self, name)
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value
            ):
                raise ValueError(f"CnnDims.{name} must be a list of positive integers, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        n = len(self.channels)
        if n == 0 or any(len(getattr(self, k)) != n for k in ("freq_strides", "time_kernels", "dilations")):
            raise ValueError("CnnDims: channels, freq_strides, time_kernels and dilations need the same length")
        for name in ("n_mels", "freq_kernel", "embed_dim", "n_classes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"CnnDims.{name} must be a positive integer, got {value!r}")
        if self.freq_kernel % 2 != 1:
            raise ValueError(f"CnnDims.freq_kernel must be odd, got {self.freq_kernel}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"CnnDims.dropout must be in [0, 1), got {self.dropout!r}")
        self._check_bounds()

    def _check_bounds(self) -> None:
        """Refuse sizes no real network has (a tampered or damaged file) before anything is allocated."""
        for name, top in MAX_VALUES.items():
            value = getattr(self, name)
            if (max(value) if isinstance(value, tuple) else value) > top:
                raise ValueError(f"CnnDims.{name} must be at most {top}, got {value!r}")
        if len(self.channels) > MAX_LAYERS:
            raise ValueError(f"CnnDims may have at most {MAX_LAYERS} layers, got {len(self.channels)}")
        if self.receptive_frames > MAX_RECEPTIVE_FRAMES:
            raise ValueError(
                f"CnnDims receptive field must be at most {MAX_RECEPTIVE_FRAMES} frames, got {self.receptive_frames}"
            )
        if self.n_parameters > MAX_PARAMETERS:
            raise ValueError(f"CnnDims describes {self.n_parameters:,} parameters, at most {MAX_PARAMETERS:,} allowed")

    @property
    def receptive_frames(self) -> int:
        """R: frames of input that one embedding depends on (time receptive field)."""
        return 1 + sum((k - 1) * d for k, d in zip(self.time_kernels, self.dilations))

    @property
    def freq_sizes(self) -> tuple[int, ...]:
        """Frequency extent after each conv layer (bins), starting with the input n_mels."""
        sizes = [self.n_mels]
        pad = self.freq_kernel // 2
        for s in self.freq_strides:
            sizes.append((sizes[-1] + 2 * pad - self.freq_kernel) // s + 1)
        return tuple(sizes)

    @property
    def n_parameters(self) -> int:
        """Numbers in the network's state dict: weights, biases and BatchNorm statistics."""
        n = 4 * self.n_mels  # input BatchNorm: weight, bias, running mean and variance
        cin = 1
        for cout, k in zip(self.channels, self.time_kernels):
            n += cin * cout * self.freq_kernel * k + 4 * cout
            cin = cout
        n += self.flat_dim * self.embed_dim + 4 * self.embed_dim
        return n + 2 * (self.embed_dim * self.n_classes + self.n_classes)

    @property
    def flat_dim(self) -> int:
        """Channels x frequency of the last conv layer, the projection's input size."""
        return self.channels[-1] * self.freq_sizes[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict with lists for tuples (what the checkpoint stores)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CnnDims:
        """Inverse of `to_dict`; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown CnnDims key(s): {', '.join(map(str, unknown))}")
        return cls(**d)


def macs_per_frame(dims: CnnDims) -> int:
    """Multiply-adds per input frame in steady state (convs, projection, both heads).

    Every layer produces one output column per input frame, so per-frame cost is the cost of
    one output column of each layer. Pooling (O(L*C) per window) is not included.
    """
    macs = 0
    cin = 1
    for cout, f_out, k in zip(dims.channels, dims.freq_sizes[1:], dims.time_kernels):
        macs += cin * cout * dims.freq_kernel * k * f_out
        cin = cout
    macs += dims.flat_dim * dims.embed_dim
    macs += 2 * dims.embed_dim * dims.n_classes
    return macs


class CheckpointError(Exception):
    """A model file is missing, unsafe, malformed or does not match the runtime frontend."""


def validate_labels(labels: list[str], thresholds: dict[str, float], dims: CnnDims) -> None:
    """Raise CheckpointError unless labels are unique and one per class; a threshold in (0, 1) for exactly the labels."""
    if len(labels) != dims.n_classes:
        raise CheckpointError(f"{len(labels)} labels for a model with {dims.n_classes} classes")
    if len(set(labels)) != len(labels) or not all(labels):
        raise CheckpointError(f"labels must be unique non-empty names, got {labels}")
    missing = [x for x in labels if x not in thresholds]
    extra = sorted(set(thresholds) - set(labels))
    if missing or extra:
        raise CheckpointError(f"thresholds must cover exactly the labels: missing {missing}, unknown {extra}")
    bad = {k: v for k, v in thresholds.items() if not (isinstance(v, float) and 0.0 < v < 1.0)}
    if bad:
        raise CheckpointError(f"thresholds must be numbers in (0, 1), got {bad}")


def check_features(feats: Any, dims: CnnDims) -> np.ndarray:
    """`feats` as float32 (T, n_mels), or ValueError naming the shape that was given."""
    feats = np.asarray(feats, dtype=np.float32)
    if feats.ndim != 2 or feats.shape[1] != dims.n_mels:
        raise ValueError(f"expected features of shape (T, {dims.n_mels}), got {feats.shape}")
    return feats


def no_windows(dims: CnnDims) -> tuple[np.ndarray, np.ndarray]:
    """The (end_frames, scores) of a signal too short for one window."""
    return np.zeros(0, dtype=np.int64), np.zeros((0, dims.n_classes), dtype=np.float32)


def default_model_path() -> Path:
    """Where the bundled model lives: source checkout first, then the installed data dir.

    Returns the first candidate that exists, else the first candidate (so an error names it).
    """
    candidates = [
        Path(__file__).resolve().parents[3] / "models" / "earshot.pt",  # source checkout / editable install
        Path(sys.prefix) / "share" / "earshot" / "models" / "earshot.pt",  # wheel install (data_files)
    ]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


# ------------------------------------------------------------------------------------------
# What a file that is not a model looks like (for one clear error line)

_FOREIGN_MAGIC = (
    (0, b"RIFF", "a WAV file"),
    (0, b"RIFX", "a WAV file"),
    (0, b"RF64", "a WAV file"),
    (0, b"fLaC", "a FLAC file"),
    (0, b"OggS", "an Ogg audio file"),
    (0, b"ID3", "an MP3 file"),
    (0, b"\xff\xfb", "an MP3 file"),
    (0, b"\xff\xf3", "an MP3 file"),
    (0, b"\xff\xf2", "an MP3 file"),
    (0, b"FORM", "an AIFF file"),
    (4, b"ftyp", "an MP4/M4A file"),
    (0, b"\x1a\x45\xdf\xa3", "a WebM/Matroska file"),
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"\x1f\x8b", "a gzip file"),
    (0, b"\x7fELF", "a program (ELF executable)"),
    (0, b"SQLite format 3\x00", "an SQLite database"),
)


def _looks_like_text(head: bytes) -> bool:
    """True if `head` (the start of a file) is printable UTF-8 text."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(head) - 3:  # not just a character cut at the end of the sample
            return False
        text = head[: exc.start].decode("utf-8")
    text = text.removeprefix("\ufeff")
    return bool(text) and all(c.isprintable() or c in "\t\r\n\f" for c in text)


def foreign_kind(head: bytes) -> str | None:
    """What the start of a file says it is when it is plainly not a model ('a WAV file'), else None."""
    for offset, magic, kind in _FOREIGN_MAGIC:
        if head[offset: offset + len(magic)] == magic:
            return kind
    if _looks_like_text(head):
        return "a text file"
    return None


def read_model_head(path: Path, what: str, n: int = 512) -> bytes:
    """The first `n` bytes of a model file, or CheckpointError (one line) if it is missing, empty,
    a folder, unreadable, or plainly some other kind of file. `what` names the expected kind
    ('earshot checkpoint', 'earshot ONNX model')."""
    if not path.exists():
        raise CheckpointError(f"model file not found: {path}; set [model] path or reinstall earshot")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not an {what}")
    try:
        with path.open("rb") as f:
            head = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{path} is empty, not an {what} (an interrupted copy?)")
    kind = foreign_kind(head)
    if kind is not None:
        raise CheckpointError(f"{path} is not an {what} (it looks like {kind})")
    return head


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line (at most `limit` characters), or its type if it has none."""
    text = " ".join(str(exc).split())
    if not text:
        return type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "CheckpointError",
    "CnnDims",
    "check_features",
    "default_model_path",
    "foreign_kind",
    "macs_per_frame",
    "no_windows",
    "one_line",
    "read_model_head",
    "validate_labels",
]
