"""`earshot plot FILE -o out.png`: one picture of what the detector made of a recording.

Five panels on a shared time axis: waveform, level per hop against the level gate, log-mel
spectrogram, per-class scores against their thresholds, and the detections as shaded spans
(also shaded on the waveform, level and score panels; not on the spectrogram, whose colours it would change). The hops come from `offline.detect_samples(..., hops=...)`,
the same analyzer and detector the daemon runs, so a false alarm or a miss in the picture is
the one the daemon would have produced with this configuration.

matplotlib is an optional extra (`pip install 'earshot[plot]'`); the Agg backend is used, so no
display is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .analyzer import Hop
from .config import DetectConfig, FrontendConfig
from .detect import make_rules
from .events import END, START, Event
from .features import FrontendParams, log_mel
from .model import ScoringModel as LoadedModel
from .offline import detect_samples

PANEL_TITLES = ("Waveform", "Level per hop (dBFS)", "Log-mel spectrogram", "Class scores and thresholds",
                "Detections")
"""Titles of the figure's axes, top to bottom (tests and docs refer to them)."""
MAX_WAVE_POINTS = 20000
"""The waveform is drawn as a min/max envelope of at most this many points (long files stay fast)."""


class PlotError(Exception):
    """The plot cannot be made (matplotlib missing); one line for the user."""


@dataclass(frozen=True)
class Analysis:
    """A recording and everything the daemon computes on it."""

    samples: np.ndarray
    sample_rate: int
    hops: list[Hop]
    events: list[Event]
    labels: list[str]
    """Labels reported (config `detect.labels`, else all the model's)."""
    all_labels: list[str]
    """The model's labels, in score order."""
    thresholds: dict[str, float]
    min_level_dbfs: float
    frontend: FrontendParams
    """The model's frontend (for the spectrogram panel)."""


def analyse(samples: np.ndarray, loaded: LoadedModel, detect: DetectConfig | None = None,
            frontend: FrontendConfig | None = None) -> Analysis:
    """Run the daemon's analyzer over a whole signal (float32 mono at the model rate)."""
    detect = detect or DetectConfig()
    hops: list[Hop] = []
    events = detect_samples(samples, loaded, detect, frontend, hops=hops)
    rules = make_rules(loaded.labels, loaded.thresholds, detect)
    return Analysis(np.asarray(samples, dtype=np.float32), loaded.frontend.sample_rate, hops, events,
                    list(rules) or list(loaded.labels), list(loaded.labels),
                    {k: r.threshold for k, r in rules.items()}, detect.min_level_dbfs, loaded.frontend)


def _spans(events: list[Event], end_s: float) -> list[tuple[float, float, str, float]]:
    """(onset, offset, label, score) per detection; a start without an end lasts to `end_s`."""
    spans, open_ = [], {}
    for e in events:
        if e.type == START:
            open_[e.id] = e
        elif e.type == END:
            open_.pop(e.id, None)
            spans.append((e.onset, float(e.offset if e.offset is not None else e.onset), e.label, e.score))
    spans += [(e.onset, end_s, e.label, e.score) for e in open_.values()]
    return sorted(spans)


def figure(analysis: Analysis, title: str = "") -> Any:
    """The matplotlib Figure (Agg) for an analysis; axes titled as PANEL_TITLES."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install 'earshot[plot]' (or pip install matplotlib)") from None

    a = analysis
    sr = a.sample_rate
    duration = a.samples.size / sr if a.samples.size else 0.0
    fig = Figure(figsize=(12, 10), dpi=80, layout="constrained")
    axes = fig.subplots(5, 1, sharex=True, gridspec_kw={"height_ratios": [1.0, 0.8, 1.6, 1.6, 0.6]})
    ax_wave, ax_level, ax_mel, ax_score, ax_det = axes
    colors = {label: f"C{i}" for i, label in enumerate(a.all_labels)}

    # Waveform as a min/max envelope: faithful to peaks at any length.
    n = a.samples.size
    if n:
        step = max(1, n // MAX_WAVE_POINTS)
        if step == 1:  # short files: an envelope of one sample per point has no width, draw the samples
            ax_wave.plot(np.arange(n) / sr, a.samples, color="0.3", linewidth=0.6)
        else:
            usable = a.samples[: (n // step) * step].reshape(-1, step)
            t = (np.arange(usable.shape[0]) * step + step / 2) / sr
            ax_wave.fill_between(t, usable.min(axis=1), usable.max(axis=1), color="0.3", linewidth=0)
    ax_wave.set_ylim(-1.05, 1.05)
    ax_wave.set_ylabel("amplitude")

    t_hop = np.array([h.t_end for h in a.hops])
    levels = np.array([h.level_dbfs for h in a.hops])
    ax_level.plot(t_hop, levels, color="0.2", linewidth=1)
    ax_level.axhline(a.min_level_dbfs, color="red", linestyle="--", linewidth=1,
                     label=f"gate {a.min_level_dbfs:.0f} dBFS (quieter hops score 0)")
    ax_level.set_ylim(max(-125.0, min(levels.min() if levels.size else -90.0, a.min_level_dbfs) - 5), 3)
    ax_level.set_ylabel("dBFS")
    ax_level.legend(loc="lower right", fontsize=8)

    # The raw log-mel (not the level-normalised model input): what a person recognises.
    mel = log_mel(a.samples, a.frontend) if n else np.zeros((0, a.frontend.n_mels))
    if len(mel):
        db = mel * (10.0 / np.log(10.0))  # natural log of power -> dB
        p = a.frontend
        # Frame i covers samples [i*hop, i*hop + win): place it at its end, like the hops.
        t0, t1 = p.win_length / sr, p.samples_for(len(mel)) / sr
        ax_mel.imshow(db.T, origin="lower", aspect="auto", cmap="magma",
                      extent=(t0, t1, 0, mel.shape[1]),
                      vmin=np.percentile(db, 5), vmax=np.percentile(db, 99.8), interpolation="nearest")
    ax_mel.set_ylabel("mel band")

    scores = np.stack([h.scores for h in a.hops]) if a.hops else np.zeros((0, len(a.all_labels)))
    for label in a.labels:
        i = a.all_labels.index(label)
        thr = a.thresholds.get(label)
        name = label if thr is None else f"{label} (threshold {thr:.2f})"
        ax_score.plot(t_hop, scores[:, i] if len(scores) else [], color=colors[label], linewidth=1.2, label=name)
        if thr is not None:
            ax_score.axhline(thr, color=colors[label], linestyle="--", linewidth=0.8)
    # Headroom above 1 for the legend: calibrated thresholds sit at 0.9-0.99, where a legend inside
    # the axes would hide them.
    ax_score.set_ylim(-0.02, 1.3)
    ax_score.set_yticks([0, 0.25, 0.5, 0.75, 1.0])
    ax_score.set_ylabel("score (dashed: threshold)")
    ax_score.legend(loc="upper right", fontsize=8, ncols=max(1, len(a.labels)), borderaxespad=0.2)

    spans = _spans(a.events, duration)
    for onset, offset, label, score in spans:
        for ax in (ax_wave, ax_level, ax_score):  # not the spectrogram: a tint would change its colours
            ax.axvspan(onset, offset, color=colors.get(label, "C9"), alpha=0.18, linewidth=0)
        row = a.labels.index(label) if label in a.labels else 0
        ax_det.barh(row, offset - onset, left=onset, height=0.7, color=colors.get(label, "C9"), alpha=0.8)
        ax_det.text(onset, row, f" {score:.2f}", va="center", fontsize=7)
    ax_det.set_yticks(range(len(a.labels)), a.labels)
    ax_det.set_ylim(-0.6, len(a.labels) - 0.4)
    ax_det.set_xlabel("time (s)")
    ax_det.set_xlim(0, max(duration, 1e-3))

    for ax, name in zip(axes, PANEL_TITLES):
        ax.set_title(name, loc="left", fontsize=10)
    found = ", ".join(f"{label} {onset:.1f}-{offset:.1f} s" for onset, offset, label, _ in spans[:6])
    more = f" (+{len(spans) - 6} more)" if len(spans) > 6 else ""
    fig.suptitle(f"{title}: {len(spans)} detection(s){': ' + found + more if spans else ''}", fontsize=11)
    return fig


def plot_file(path: str | Path, out: str | Path, loaded: LoadedModel, detect: DetectConfig | None = None,
              frontend: FrontendConfig | None = None, dpi: int = 80) -> Analysis:
    """Analyse an audio file and write its figure to `out` (png, svg or pdf by extension; 12x10 in at `dpi`)."""
    from .capture import iter_file_blocks
    from .offline import BLOCK_S

    blocks = list(iter_file_blocks(path, loaded.frontend.sample_rate, block_s=BLOCK_S))
    samples = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)
    analysis = analyse(samples, loaded, detect, frontend)
    fig = figure(analysis, title=Path(path).name)
    fig.savefig(out, dpi=dpi)
    return analysis
