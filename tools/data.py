"""Training data: read an index of labelled recordings, split it by group, load audio, find active regions.

The data folder is laid out like `/work/shared/data` (see its README): an `index.csv` with columns
`path,label,kind,source,group,duration_s` (and optionally `freesound_id,license`) and audio files at
`path` relative to the folder, 16 kHz mono. Any folder laid out the same way works, so users can train
on their own recordings. This module never writes into that folder.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

EVENT_LABELS = ("alarm", "glass_break", "gunshot")
"""Positive classes, in the model's output order (equals `earshot.synth.LABELS`)."""
NEGATIVE = "negative"
"""Label of recordings that must not fire any class."""
REQUIRED_COLUMNS = ("path", "label", "kind", "source", "group")
SAMPLE_RATE = 16000
"""Every recording must be at this rate (hertz)."""
VAL_FRACTION = 0.2
"""Fraction of the groups of every (label, source) that goes to validation."""
SPLIT_SALT = "earshot-split-v1"
"""Mixed into the group hash; changing it reshuffles the split (do not, or validation numbers move)."""
HELDOUT_SOURCES = (
    "caitlinnguyen0/ESC-50",  # alarm + glass_break + 40 everyday classes (urban, household, impulsive)
    "BenSandeen/surveillance_sound_classifier",  # Freesound gunshots; screams, bangs, fireworks, slams
    "ASUCICREPO/phoenix-pd-gunshot-detection",  # gunshots recorded for a police department; thunder
    "AssafAssaf/GlassBreakageDetector",  # glass breaks and everyday sounds of one uploader
    "darrenbrazas/tinyml-audio-alert",  # fire-alarm beeps; room noise with keys, typing, talk
    "amrrashed/Sound-Based-Vehicle-Diagnostics-Emergency-Signal-Recognition",  # sirens; traffic, trains
    "tyiannak/pyAudioAnalysis",  # speech, conversation, music
    "sylaschacko/voice-emotion-analysis",  # German emotional speech (EmoDB)
)
"""Sources never used for training: validation by held-out source (every class has a positive source
here, and the negatives span urban, household, impulsive, vehicle, speech and music sounds, 1.5 h).
A split by group inside the same sources shares microphones, rooms, uploaders and editing with the
training set and overstates quality several times over; this one measures recordings never heard."""


class DataError(Exception):
    """The data folder or its index is unusable (one clear message)."""


@dataclass(frozen=True)
class Clip:
    """One row of the index."""

    path: str
    """Path of the audio file, relative to the data folder."""
    label: str
    """`alarm`, `glass_break`, `gunshot` or `negative`."""
    kind: str
    """The source's own finer label (e.g. `siren`, `dog_bark`); may be empty."""
    source: str
    """Repository or collection the recording came from."""
    group: str
    """Recordings that share an original share a group; the split never separates a group."""
    duration_s: float
    """Length of the recording (seconds), as listed in the index."""
    license: str = ""
    """License text from the index, if given."""


def default_data_dir() -> Path:
    """`../shared/data` relative to the repository root (this file lives in `<repo>/tools`)."""
    return Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def read_index(data_dir: str | Path) -> list[Clip]:
    """Read `<data_dir>/index.csv`; raises `DataError` with one clear line if it is missing or malformed."""
    index = Path(data_dir) / "index.csv"
    if not index.is_file():
        raise DataError(f"no index.csv in data folder {data_dir} (see tools/data.py for the layout)")
    with index.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{index}: missing column(s) {', '.join(missing)}")
        clips = []
        for line, row in enumerate(reader, start=2):
            label = row["label"].strip()
            if label not in EVENT_LABELS and label != NEGATIVE:
                raise DataError(f"{index}:{line}: unknown label {label!r}")
            try:
                duration = float(row.get("duration_s") or "nan")
            except ValueError as exc:
                raise DataError(f"{index}:{line}: bad duration_s {row.get('duration_s')!r}") from exc
            clips.append(
                Clip(
                    path=row["path"],
                    label=label,
                    kind=row["kind"],
                    source=row["source"],
                    group=row["group"] or row["path"],
                    duration_s=duration,
                    license=row.get("license", "") or "",
                )
            )
    if not clips:
        raise DataError(f"{index}: no rows")
    return clips


def index_sha256(data_dir: str | Path) -> str:
    """SHA-256 of the index file, recorded in the checkpoint's provenance."""
    return hashlib.sha256((Path(data_dir) / "index.csv").read_bytes()).hexdigest()


def _group_rank(group: str) -> str:
    """A stable pseudo-random order of groups (independent of Python's hash seed)."""
    return hashlib.sha256(f"{SPLIT_SALT}:{group}".encode()).hexdigest()


def validation_groups(clips: list[Clip], fraction: float = VAL_FRACTION) -> set[str]:
    """The groups held out for validation: deterministic, about `fraction` of every (label, source).

    Stratifying by source puts every source with at least two groups into validation (so per-source
    recall can be compared); a source with one group stays in training. A group lives in one label,
    but if it spans several strata, being chosen by any of them sends all its files to validation.
    """
    strata: dict[tuple[str, str], set[str]] = defaultdict(set)
    for c in clips:
        strata[(c.label, c.source)].add(c.group)
    chosen: set[str] = set()
    for key in sorted(strata):
        groups = sorted(strata[key], key=_group_rank)
        if len(groups) < 2:
            continue
        n_val = max(1, int(round(fraction * len(groups))))
        chosen.update(groups[:n_val])
    return chosen


def split(clips: list[Clip], fraction: float = VAL_FRACTION) -> tuple[list[Clip], list[Clip]]:
    """(train, validation) clips, split by group (see `validation_groups`)."""
    val = validation_groups(clips, fraction)
    return [c for c in clips if c.group not in val], [c for c in clips if c.group in val]


def source_split(clips: list[Clip], fraction: float = VAL_FRACTION, heldout_sources: Sequence[str] = HELDOUT_SOURCES
                 ) -> tuple[list[Clip], list[Clip], list[Clip]]:
    """(train, group validation, held-out-source validation).

    Held-out sources are removed whole; the rest is split by group as `split` does (the group
    validation measures how well the model knows its own sources, kept beside the held-out figure).
    """
    held = set(heldout_sources)
    heldout = [c for c in clips if c.source in held]
    train, val = split([c for c in clips if c.source not in held], fraction)
    return train, val, heldout


def parse_sources(text: str | None) -> tuple[str, ...]:
    """A comma-separated list of sources (for --heldout-sources); None gives HELDOUT_SOURCES."""
    if text is None:
        return HELDOUT_SOURCES
    return tuple(s.strip() for s in text.split(",") if s.strip())


def load_audio(data_dir: str | Path, clip: Clip) -> np.ndarray:
    """The clip's samples as float32 mono in [-1, 1]; raises `DataError` on a wrong rate or channel count."""
    import soundfile as sf

    path = Path(data_dir) / clip.path
    try:
        x, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError) as exc:  # soundfile raises LibsndfileError (a RuntimeError)
        raise DataError(f"cannot read {path}: {exc}") from exc
    if sr != SAMPLE_RATE:
        raise DataError(f"{path}: sample rate {sr} Hz, expected {SAMPLE_RATE} (resample your data first)")
    return np.ascontiguousarray(x.mean(axis=1), dtype=np.float32)


def load_all(data_dir: str | Path, clips: list[Clip]) -> list[np.ndarray]:
    """Audio of every clip, in order (the whole 3.6 h set is about 0.8 GB as float32)."""
    return [load_audio(data_dir, c) for c in clips]


# ---------------------------------------------------------------------------
# Active regions (clips are weakly labelled: where the event sits is not given)

ACTIVITY_HOP = 160
"""Activity is computed on 10 ms steps, the frontend's hop, so masks line up with feature frames."""


@dataclass(frozen=True)
class ActivityParams:
    """How `activity_mask` finds an event in a clip's energy envelope."""

    rel_db: float = 25.0
    """Never mark steps more than this far below the peak (dB)."""
    frac: float = 0.5
    """Threshold position between noise floor (0) and peak (1), in dB."""
    min_range_db: float = 6.0
    """Clips whose level varies less than this (dB) are active throughout."""
    bridge_s: float = 0.15
    """Gaps up to this long (s) between active steps are bridged."""


IMPULSIVE_ACTIVITY = ActivityParams()
"""Gunshots, glass breaks: the loud part and its ringing, separate shots kept apart."""
TONAL_ACTIVITY = ActivityParams(rel_db=30.0, frac=0.25, bridge_s=0.6)
"""Alarms and sirens: a siren's level swings by 20 dB over a sweep and through traffic, yet it is audible
throughout; beeps 0.5 s apart (T3) are one event."""


def activity_params(label: str) -> ActivityParams:
    """Activity parameters for a class (alarms are tonal and continuous, the rest impulsive)."""
    return TONAL_ACTIVITY if label == "alarm" else IMPULSIVE_ACTIVITY


def activity_mask(x: np.ndarray, params: ActivityParams = IMPULSIVE_ACTIVITY, hop: int = ACTIVITY_HOP) -> np.ndarray:
    """Boolean per-hop mask of where the event in a clip is active, from its energy envelope.

    A step is active when its level is above both `peak - rel_db` and the point `frac` of the way (in
    dB) from the clip's noise floor (10th percentile) to its peak. Steady clips whose level varies less
    than `min_range_db` (a siren recorded close up) are active throughout. Gaps up to `bridge_s` are
    bridged so a beep pattern or a reverberant crash counts as one event, and 30 ms is added on both
    sides for the attack before the first loud step.
    """
    n = max(1, len(x) // hop)
    frames = x[: n * hop].reshape(n, hop) if len(x) >= hop else np.pad(x, (0, hop - len(x)))[None, :]
    level = 10.0 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-10)
    peak = float(level.max())
    floor = float(np.percentile(level, 10))
    if peak - floor < params.min_range_db:
        return np.ones(n, dtype=bool)
    thr = max(peak - params.rel_db, floor + params.frac * (peak - floor))
    mask = level >= thr
    idx = np.flatnonzero(mask)
    gaps = np.diff(idx)
    bridge = int(round(params.bridge_s * SAMPLE_RATE / hop))
    for a, g in zip(idx[:-1], gaps):
        if 1 < g <= bridge:
            mask[a : a + g] = True
    pad = 3
    grown = mask.copy()
    for k in range(1, pad + 1):
        grown[:-k] |= mask[k:]
        grown[k:] |= mask[:-k]
    return grown


def active_region(x: np.ndarray, sr: int = SAMPLE_RATE, params: ActivityParams = IMPULSIVE_ACTIVITY) -> tuple[float, float]:
    """(start_s, end_s) of the event in a clip: first to last active step of `activity_mask`."""
    mask = activity_mask(x, params)
    idx = np.flatnonzero(mask)
    return idx[0] * ACTIVITY_HOP / sr, (idx[-1] + 1) * ACTIVITY_HOP / sr


def summarize(clips: list[Clip]) -> dict:
    """Counts per label: files, groups and sources (for provenance and the model card)."""
    out: dict = {}
    for label in (*EVENT_LABELS, NEGATIVE):
        sel = [c for c in clips if c.label == label]
        out[label] = {
            "files": len(sel),
            "groups": len({c.group for c in sel}),
            "sources": sorted({c.source for c in sel}),
        }
    return out
