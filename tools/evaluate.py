"""Evaluate a checkpoint on the validation recordings, through the daemon's own detection path.

    python tools/evaluate.py --data ../shared/data --model models/earshot.pt \\
        [--calibrate --target-fa-per-hour 1] [--json models/eval.json]

Only validation groups and only real recordings are used (see `data.validation_groups`).

- Mixtures: every validation event clip (trimmed to its active region plus a short margin) is mixed
  into 30 s streams of concatenated validation negatives, a few events per stream with gaps, at
  event-to-background ratios of -6, 0 and +6 dB (same streams and positions at every EBR, fixed
  seed). Each stream goes through `earshot.offline.detect_samples`, the code `earshot detect` runs.
  Scores: DCASE 2017 task 2 event-based metrics (onset only, 0.5 s collar) per class: precision,
  recall, F1, error rate (deletions + insertions over reference events); recall per EBR and per source.
- False alarms: all validation negatives concatenated at their recorded levels into long streams
  with no events; `start` events per class, scaled to per hour, and which kinds of sound caused them.
- `--calibrate`: the validation groups are split in two halves by group hash. Per class, the lowest
  threshold (most recall) whose false-alarm rate on the calibration half's negatives is within the
  target is chosen, then the checkpoint is re-saved with those thresholds and every reported number
  comes from the other (report) half, run again through `detect_samples` with the new thresholds.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections import defaultdict  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from datetime import datetime, timezone  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data  # noqa: E402

log = logging.getLogger("evaluate")

COLLAR_S = 0.5
"""Onset collar of the DCASE 2017 task 2 event-based metric (s)."""
EBRS_DB = (-6.0, 0.0, 6.0)
"""Event-to-background ratios of the mixtures (dB), as in DCASE 2017 task 2."""
STREAM_S = 30.0
"""Length of each mixture stream (s)."""
MAX_EVENT_S = 8.0
"""Event clips are cut to at most this much active sound (s)."""
BACKGROUND_DBFS = -35.0
"""RMS level of the mixture backgrounds (dBFS); detection is gain invariant above the level gate."""
FA_STREAM_S = 600.0
"""False-alarm streams are cut into pieces of this length (s) before detection."""
THRESHOLD_GRID = tuple(round(x, 3) for x in np.concatenate([np.arange(0.20, 0.90, 0.05), np.arange(0.90, 0.995, 0.01), [0.995, 0.998, 0.999]]))
"""Candidate thresholds for calibration."""


# ---------------------------------------------------------------------------
# DCASE 2017 task 2 event-based metrics (onset only)


@dataclass(frozen=True)
class RefEvent:
    """A reference (ground truth) event."""

    label: str
    onset: float
    offset: float
    stream: int
    """Index of the stream it is in."""
    source: str = ""
    """Where the clip came from (for per-source recall)."""
    ebr_db: float = 0.0


@dataclass(frozen=True)
class EstEvent:
    """A detected event (from a `start`/`end` pair, or a `start` alone)."""

    label: str
    onset: float
    stream: int


def match_onsets(ref: Sequence[float], est: Sequence[float], collar: float = COLLAR_S) -> list[tuple[int, int]]:
    """Maximum one-to-one matching of reference and estimated onsets with |ref - est| <= collar.

    Returns (ref index, est index) pairs. Ties are broken towards the closest onsets (as sed_eval's
    optimal matching: maximum cardinality first, then smallest total distance).
    """
    if not ref or not est:
        return []
    r = np.asarray(ref, dtype=np.float64)[:, None]
    e = np.asarray(est, dtype=np.float64)[None, :]
    dist = np.abs(r - e)
    ok = dist <= collar + 1e-9
    if not ok.any():
        return []
    # Every admissible pair is worth much more than any distance, so cardinality comes first.
    cost = np.where(ok, dist - 1e3, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return [(int(i), int(j)) for i, j in zip(rows, cols) if ok[i, j]]


@dataclass
class ClassCounts:
    """Event-based counts of one class."""

    n_ref: int = 0
    n_est: int = 0
    tp: int = 0

    @property
    def fp(self) -> int:
        """Insertions."""
        return self.n_est - self.tp

    @property
    def fn(self) -> int:
        """Deletions."""
        return self.n_ref - self.tp

    def metrics(self) -> dict[str, float | int]:
        """Precision, recall, F1 and class-wise error rate ((D + I) / N), with the counts."""
        p = self.tp / self.n_est if self.n_est else float("nan")
        r = self.tp / self.n_ref if self.n_ref else float("nan")
        f1 = 2 * self.tp / (self.n_ref + self.n_est) if (self.n_ref + self.n_est) else float("nan")
        er = (self.fn + self.fp) / self.n_ref if self.n_ref else float("nan")
        return {"precision": p, "recall": r, "f1": f1, "error_rate": er, "n_ref": self.n_ref, "n_est": self.n_est,
                "tp": self.tp, "insertions": self.fp, "deletions": self.fn}


def event_based(ref: Sequence[RefEvent], est: Sequence[EstEvent], labels: Sequence[str], collar: float = COLLAR_S
                ) -> tuple[dict[str, ClassCounts], set[int]]:
    """Per-class counts over all streams, and the indices (into `ref`) of the detected reference events.

    Matching is per (stream, class) on onsets only, like DCASE 2017 task 2; an estimate of another
    class never matches (it is an insertion of its own class).
    """
    counts = {label: ClassCounts() for label in labels}
    hit: set[int] = set()
    by_key_ref: dict[tuple[int, str], list[int]] = defaultdict(list)
    by_key_est: dict[tuple[int, str], list[float]] = defaultdict(list)
    for i, ev in enumerate(ref):
        by_key_ref[(ev.stream, ev.label)].append(i)
    for ev in est:
        by_key_est[(ev.stream, ev.label)].append(ev.onset)
    for label in labels:
        counts[label].n_ref = sum(1 for ev in ref if ev.label == label)
        counts[label].n_est = sum(1 for ev in est if ev.label == label)
    for key in set(by_key_ref) | set(by_key_est):
        idx = by_key_ref.get(key, [])
        pairs = match_onsets([ref[i].onset for i in idx], by_key_est.get(key, []), collar)
        if key[1] in counts:
            counts[key[1]].tp += len(pairs)
        hit.update(idx[i] for i, _ in pairs)
    return counts, hit


def summary(counts: dict[str, ClassCounts]) -> dict[str, float]:
    """Class-wise averages of F1 and error rate (the DCASE 2017 task 2 ranking metric is the mean ER)."""
    ms = [c.metrics() for c in counts.values() if c.n_ref]
    return {"f1_macro": float(np.mean([m["f1"] for m in ms])) if ms else float("nan"),
            "error_rate_macro": float(np.mean([m["error_rate"] for m in ms])) if ms else float("nan")}


# ---------------------------------------------------------------------------
# Building the evaluation streams


def calibration_halves(clips: Sequence[data.Clip]) -> dict[str, str]:
    """Validation group -> 'cal' or 'report': per label, groups in a fixed hash order alternate halves.

    Alternating within each label gives both halves events of every class and negatives whenever a
    label has two or more validation groups; the hash order makes it independent of file order.
    """
    by_label: dict[str, set[str]] = defaultdict(set)
    for c in clips:
        by_label[c.label].add(c.group)
    halves = {}
    for label in sorted(by_label):
        ranked = sorted(by_label[label], key=lambda g: hashlib.sha256(f"earshot-calib:{g}".encode()).hexdigest())
        for i, g in enumerate(ranked):
            halves[g] = "cal" if i % 2 == 0 else "report"
    return halves


@dataclass
class EventClip:
    """A validation event trimmed to its active region (plus margin)."""

    clip: data.Clip
    samples: np.ndarray
    active_s: tuple[float, float]
    """Active region within `samples` (s)."""
    mask: np.ndarray
    """Per-10 ms activity within `samples`."""


def trim_event(clip: data.Clip, x: np.ndarray, sr: int) -> EventClip:
    """Cut a clip to its active region with 0.1 s before and 0.3 s after (20 ms fades), at most MAX_EVENT_S of activity."""
    mask = data.activity_mask(x, data.activity_params(clip.label))
    idx = np.flatnonzero(mask)
    hop = data.ACTIVITY_HOP
    a0, a1 = int(idx[0]), int(idx[-1]) + 1
    a1 = min(a1, a0 + int(MAX_EVENT_S * sr / hop))
    s0 = max(0, a0 * hop - int(0.1 * sr))
    s1 = min(len(x), a1 * hop + int(0.3 * sr))
    seg = x[s0:s1].astype(np.float32).copy()
    fade = min(len(seg) // 4, int(0.02 * sr))
    if fade > 0:
        ramp = np.linspace(0.0, 1.0, fade, dtype=np.float32)
        if s0 > 0:
            seg[:fade] *= ramp
        if s1 < len(x):
            seg[-fade:] *= ramp[::-1]
    m = np.zeros(len(seg) // hop + 1, dtype=bool)
    m[max(0, a0 - s0 // hop) : a1 - s0 // hop] = True
    return EventClip(clip, seg, ((a0 * hop - s0) / sr, (a1 * hop - s0) / sr), m)


def concat_negatives(items: Sequence[tuple[data.Clip, np.ndarray]], rng: np.random.Generator, normalize: bool
                     ) -> tuple[np.ndarray, list[tuple[float, float, data.Clip]]]:
    """Negatives in random order, joined with 20 ms crossfades; returns audio and (start_s, end_s, clip) spans."""
    sr, fade = data.SAMPLE_RATE, 320
    parts, spans, pos = [], [], 0
    for i in rng.permutation(len(items)):
        clip, x = items[int(i)]
        x = x.astype(np.float64)
        if normalize:
            x = x / (np.sqrt(np.mean(x**2)) + 1e-8)
        if len(x) <= 2 * fade:
            continue
        x = x.copy()
        ramp = np.linspace(0.0, 1.0, fade)
        x[:fade] *= ramp
        x[-fade:] *= ramp[::-1]
        start = max(0, pos - fade)
        parts.append((start, x))
        spans.append((start / sr, (start + len(x)) / sr, clip))
        pos = start + len(x)
    out = np.zeros(pos)
    for start, x in parts:
        out[start : start + len(x)] += x
    return out, spans


def half_parts(items: Sequence[tuple[data.Clip, np.ndarray]], halves: dict[str, str], half: str | None, loaded
               ) -> tuple[list[EventClip], list[tuple[data.Clip, np.ndarray]]]:
    """(trimmed events of the model's labels, negatives) of the validation groups in `half` (None = all)."""
    sel = [(c, x) for c, x in items if half is None or halves[c.group] == half]
    events = [trim_event(c, x, loaded.frontend.sample_rate) for c, x in sel
              if c.label in loaded.labels and len(x) >= loaded.frontend.win_length]
    negatives = [(c, x) for c, x in sel if c.label == data.NEGATIVE]
    return events, negatives


@dataclass
class Mixtures:
    """Mixture streams at each EBR with their reference events (same positions at every EBR)."""

    streams: dict[float, list[np.ndarray]] = field(default_factory=dict)
    refs: dict[float, list[RefEvent]] = field(default_factory=dict)


def build_mixtures(events: Sequence[EventClip], negatives: Sequence[tuple[data.Clip, np.ndarray]], seed: int,
                   ebrs: Sequence[float] = EBRS_DB) -> Mixtures:
    """Pack events into 30 s background streams with 3-6 s gaps; mix at each EBR (see module docstring)."""
    sr = data.SAMPLE_RATE
    rng = np.random.default_rng([seed, 1])
    bg_all, _ = concat_negatives(negatives, rng, normalize=True)
    n_stream = int(STREAM_S * sr)
    order = [events[int(i)] for i in rng.permutation(len(events))]
    # Layout: list of streams, each a list of (start sample, EventClip).
    layouts: list[list[tuple[int, EventClip]]] = []
    cur: list[tuple[int, EventClip]] = []
    t = int(rng.uniform(1.5, 4.0) * sr)
    for ev in order:
        if t + len(ev.samples) > n_stream - int(1.0 * sr):
            layouts.append(cur)
            cur, t = [], int(rng.uniform(1.5, 4.0) * sr)
        cur.append((t, ev))
        t += len(ev.samples) + int(rng.uniform(3.0, 6.0) * sr)
    if cur:
        layouts.append(cur)
    # One background stretch per stream (wrapping around the concatenated negatives).
    offsets = rng.integers(0, max(1, len(bg_all) - n_stream), size=len(layouts))
    out = Mixtures()
    for ebr in ebrs:
        streams, refs = [], []
        for k, layout in enumerate(layouts):
            bg = bg_all[offsets[k] : offsets[k] + n_stream]
            if len(bg) < n_stream:
                bg = np.resize(bg_all, n_stream)
            bg = bg * (10 ** (BACKGROUND_DBFS / 20) / (np.sqrt(np.mean(bg**2)) + 1e-12))
            mix = bg.copy()
            for start, ev in layout:
                a, b = int(ev.active_s[0] * sr), int(ev.active_s[1] * sr)
                ev_rms = float(np.sqrt(np.mean(ev.samples[a:b].astype(np.float64) ** 2)) + 1e-12)
                bg_rms = float(np.sqrt(np.mean(bg[start + a : start + b] ** 2)) + 1e-12)
                gain = bg_rms * 10 ** (ebr / 20) / ev_rms
                mix[start : start + len(ev.samples)] += gain * ev.samples
                refs.append(RefEvent(ev.clip.label, start / sr + ev.active_s[0], start / sr + ev.active_s[1], k,
                                     ev.clip.source, ebr))
            peak = float(np.max(np.abs(mix)))
            if peak > 0.99:  # keep it unclipped: scale the whole stream (gain invariant features)
                mix *= 0.99 / peak
            streams.append(mix.astype(np.float32))
        out.streams[ebr] = streams
        out.refs[ebr] = refs
    return out


# ---------------------------------------------------------------------------
# Running the detector


def run_streams(streams: Sequence[np.ndarray], loaded, keep_hops: bool = False):
    """`detect_samples` on each stream; returns (estimated events, per-stream hops or None)."""
    from earshot.offline import detect_samples

    est: list[EstEvent] = []
    all_hops = []
    for k, x in enumerate(streams):
        hops: list | None = [] if keep_hops else None
        for ev in detect_samples(x, loaded, source="eval", hops=hops):
            if ev.type == "start":
                est.append(EstEvent(ev.label, ev.onset, k))
        all_hops.append(hops)
    return est, all_hops


def replay(hops_per_stream, loaded, thresholds: dict[str, float]) -> list[EstEvent]:
    """The daemon's event state machine over recorded hops, with other thresholds (for calibration sweeps)."""
    from earshot.config import DetectConfig
    from earshot.detect import Detector, make_rules

    p = loaded.frontend
    hop_s = 0.1
    est = []
    for k, hops in enumerate(hops_per_stream):
        if len(hops) > 1:
            hop_s = hops[1].t_end - hops[0].t_end
        det = Detector(list(loaded.labels), make_rules(list(loaded.labels), thresholds, DetectConfig()),
                       source="eval", node="eval", chunk_s=p.chunk_s, hop_s=hop_s, to_wall=lambda t: t)
        for h in hops:
            for ev in det.update(h.t_end, h.scores):
                if ev.type == "start":
                    est.append(EstEvent(ev.label, ev.onset, k))
    return est


def fa_streams(negatives: Sequence[tuple[data.Clip, np.ndarray]], seed: int
               ) -> tuple[list[np.ndarray], list[list[tuple[float, float, data.Clip]]]]:
    """All negatives at their recorded levels, concatenated and cut into FA_STREAM_S pieces."""
    audio, spans = concat_negatives(negatives, np.random.default_rng([seed, 2]), normalize=False)
    n = int(FA_STREAM_S * data.SAMPLE_RATE)
    streams, stream_spans = [], []
    for k in range(0, len(audio), n):
        streams.append(np.clip(audio[k : k + n], -1, 1).astype(np.float32))
        t0, t1 = k / data.SAMPLE_RATE, (k + n) / data.SAMPLE_RATE
        stream_spans.append([(a - t0, b - t0, c) for a, b, c in spans if b > t0 and a < t1])
    return streams, stream_spans


def fa_report(est: list[EstEvent], streams, spans, labels) -> dict:
    """False alarms per hour per class, and the kinds of sound that caused them."""
    hours = sum(len(x) for x in streams) / data.SAMPLE_RATE / 3600
    per_class = {label: 0 for label in labels}
    culprits: dict[str, dict[str, int]] = {label: defaultdict(int) for label in labels}
    for ev in est:
        per_class[ev.label] += 1
        kind = "?"
        for a, b, c in spans[ev.stream]:
            if a <= ev.onset < b:
                kind = f"{c.kind or '-'} ({c.source.split('/')[-1]})"
        culprits[ev.label][kind] += 1
    return {
        "hours": hours,
        "false_alarms": per_class,
        "per_hour": {k: v / hours if hours else float("nan") for k, v in per_class.items()},
        "causes": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])[:10]) for k, v in culprits.items()},
    }


def mixture_report(mix: Mixtures, est_by_ebr: dict[float, list[EstEvent]], labels) -> dict:
    """Per-EBR and overall (all EBRs pooled) event-based metrics, recall per EBR and per source."""
    out: dict = {"per_ebr": {}, "recall_by_ebr": {}, "recall_by_source": {}}
    src_hits: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ebr in mix.refs:
        refs, est = mix.refs[ebr], est_by_ebr[ebr]
        counts, hit = event_based(refs, est, labels)
        out["per_ebr"][f"{ebr:+.0f}"] = {"classes": {k: c.metrics() for k, c in counts.items()}, **summary(counts)}
        out["recall_by_ebr"][f"{ebr:+.0f}"] = {k: c.metrics()["recall"] for k, c in counts.items()}
        for i, r in enumerate(refs):
            key = f"{r.label} | {r.source}"
            src_hits[key][0] += int(i in hit)
            src_hits[key][1] += 1
    out["recall_by_source"] = {k: {"recall": h / n, "n": n} for k, (h, n) in sorted(src_hits.items())}
    return out


ALERT_SLACK_S = 1.0
"""An event counts as alerted when a detection of its class starts within this long of it (s)."""


def alerted(refs: Sequence[RefEvent], est: Sequence[EstEvent], labels: Sequence[str], slack: float = ALERT_SLACK_S
            ) -> dict[str, float]:
    """Per class, the share of reference events with a detection of their class starting between
    `slack` before their onset and `slack` after their offset (what a user sees as "it alerted")."""
    by_key: dict[tuple[int, str], list[float]] = defaultdict(list)
    for e in est:
        by_key[(e.stream, e.label)].append(e.onset)
    out = {}
    for label in labels:
        mine = [r for r in refs if r.label == label]
        hits = sum(1 for r in mine if any(r.onset - slack <= t <= r.offset + slack for t in by_key[(r.stream, label)]))
        out[label] = hits / len(mine) if mine else float("nan")
    return out


def onset_stats(refs: Sequence[RefEvent], est: Sequence[EstEvent], labels: Sequence[str], slack: float = ALERT_SLACK_S
                ) -> dict[str, dict[str, float]]:
    """Per class, over alerted events: median and 90th percentile of (first detection's onset - true onset)
    in seconds, and repeats (detections beyond the first within the event +- slack) per alerted event."""
    by_key: dict[tuple[int, str], list[float]] = defaultdict(list)
    for e in est:
        by_key[(e.stream, e.label)].append(e.onset)
    out = {}
    for label in labels:
        errors, repeats = [], []
        for r in refs:
            if r.label != label:
                continue
            near = sorted(t for t in by_key[(r.stream, label)] if r.onset - slack <= t <= r.offset + slack)
            if near:
                errors.append(near[0] - r.onset)
                repeats.append(len(near) - 1)
        out[label] = {"median_onset_error_s": float(np.median(errors)) if errors else float("nan"),
                      "p90_abs_onset_error_s": float(np.percentile(np.abs(errors), 90)) if errors else float("nan"),
                      "repeats_per_event": float(np.mean(repeats)) if repeats else float("nan")}
    return out


CURVE_GRID = (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999)
"""Thresholds of the operating curve (`operating_curve`)."""
CURVE_FA_LIMITS = (2.0, 10.0)
"""False alarms per hour at which the curve's best alerted share is summarised."""


def operating_curve(refs_by_ebr: dict[float, Sequence[RefEvent]], hops_by_ebr: dict, fa_hops, fa_hours: float,
                    loaded) -> dict:
    """The trade-off behind one operating point: per class and threshold (`CURVE_GRID`), false alarms per
    hour on the reported negatives and the share of events alerted at each EBR; and, per false-alarm
    limit (`CURVE_FA_LIMITS`), the best 0 dB alerted share of a threshold within it (with its -6 dB share).

    Two models compared at their calibrated thresholds differ by where calibration landed as much as by
    what they learnt; at matched false alarms on the same negatives they differ by what they learnt. The
    limit is applied to the reported negatives themselves, so these are curve points, not calibrated results.
    """
    labels = list(loaded.labels)
    rows: dict[str, list[dict]] = {label: [] for label in labels}
    for t in CURVE_GRID:
        th = {label: float(t) for label in labels}
        fa = replay(fa_hops, loaded, th)
        shares = {ebr: alerted(refs, replay(hops_by_ebr[ebr], loaded, th), labels) for ebr, refs in refs_by_ebr.items()}
        for label in labels:
            rows[label].append({"threshold": float(t), "fa_per_hour": sum(e.label == label for e in fa) / fa_hours,
                                **{f"alerted_{ebr:+.0f}db": shares[ebr][label] for ebr in refs_by_ebr}})
    at_limit: dict[str, dict] = {}
    for limit in CURVE_FA_LIMITS:
        at_limit[f"{limit:g}"] = {}
        for label in labels:
            ok = [r for r in rows[label] if r["fa_per_hour"] <= limit]
            at_limit[f"{limit:g}"][label] = max(ok, key=lambda r: (r["alerted_+0db"], -r["threshold"])) if ok else None
    return {"sweep": rows, "best_within_fa_per_hour": at_limit}


def source_halves(heldout: Sequence[data.Clip]) -> dict[str, str]:
    """Held-out negative group -> 'cal' (a third, for thresholds) or 'report' (two thirds, >= 1 h).

    Held-out positives are never used for calibration: the rule needs only negatives, so every
    held-out event is reported on."""
    groups = sorted({c.group for c in heldout if c.label == data.NEGATIVE},
                    key=lambda g: hashlib.sha256(f"earshot-heldout-cal:{g}".encode()).hexdigest())
    halves = {g: ("cal" if i % 3 == 0 else "report") for i, g in enumerate(groups)}
    halves.update({c.group: "report" for c in heldout if c.label != data.NEGATIVE})
    return halves


TRIGGER_GRID = (0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)
"""Candidate stage-1 triggers of a cascade (the same for every confirmed class)."""


class _CallCounter:
    """Stands in for a confirmer to count how often a trigger would call it (calls depend only on stage 1)."""

    def __init__(self, trigger: float, reuse_hops: int, confirmed: list[bool]):
        self.trigger_array = np.where(confirmed, trigger, np.inf).astype(np.float32)
        self.reuse_hops, self.labels, self.calls = reuse_hops, list(range(len(confirmed))), 0

    def score(self, window) -> np.ndarray:
        self.calls += 1
        return np.zeros(len(self.labels), dtype=np.float32)


def choose_trigger(neg_sets, loaded, seed: int, max_calls_per_hour: float) -> tuple[float, dict[float, float]]:
    """The lowest TRIGGER_GRID value whose confirmer calls per hour on the negatives (the most of the sets)
    stay within `max_calls_per_hour`, which bounds the cascade's CPU cost; (trigger, calls/hour by trigger)."""
    from dataclasses import replace

    from earshot.model import CascadeState

    plain = replace(loaded, confirmer=None)
    runs = []
    for negs in neg_sets:
        fa_s, _ = fa_streams(negs, seed)
        _, hops = run_streams(fa_s, plain, keep_hops=True)
        runs.append(([np.stack([h.scores for h in hs]) for hs in hops if hs],
                     sum(len(x) for x in fa_s) / loaded.frontend.sample_rate / 3600))
    rates = {}
    for trig in TRIGGER_GRID:
        per_set = []
        for streams, hours in runs:
            counter = _CallCounter(trig, loaded.confirmer.reuse_hops,
                                   [label in loaded.confirmer.triggers for label in loaded.labels])
            for scores in streams:
                state = CascadeState(counter)
                for row in scores:
                    state.apply(row, lambda: None)
            per_set.append(counter.calls / hours)
        rates[trig] = max(per_set)
    ok = [t for t in TRIGGER_GRID if rates[t] <= max_calls_per_hour]
    return (ok[0] if ok else TRIGGER_GRID[-1]), rates


def calibrate_negatives(neg_sets: Sequence[Sequence[tuple[data.Clip, np.ndarray]]], loaded, seed: int, target: float,
                        min_threshold: float = 0.0) -> tuple[dict[str, float], dict]:
    """Per class, the lowest grid threshold (at least `min_threshold`) whose false alarms/hour is within
    `target` on EVERY set of negatives (long streams at recorded levels); no positives are needed, so
    none are used."""
    labels = list(loaded.labels)
    runs = []
    for negs in neg_sets:
        fa_s, _ = fa_streams(negs, seed)
        _, hops = run_streams(fa_s, loaded, keep_hops=True)
        runs.append((hops, sum(len(x) for x in fa_s) / loaded.frontend.sample_rate / 3600))
    table: dict[str, list[dict]] = {label: [] for label in labels}
    for t in (t for t in THRESHOLD_GRID if t >= min_threshold):
        th = {label: float(t) for label in labels}
        rates = []
        for hops, hours in runs:
            fa = replay(hops, loaded, th)
            rates.append({label: sum(1 for e in fa if e.label == label) / hours for label in labels})
        for label in labels:
            table[label].append({"threshold": float(t), "fa_per_hour": max(r[label] for r in rates),
                                 "f1_0db": float("nan")})
    chosen, notes = pick_thresholds(table, target)
    return chosen, {"sweep": table, "notes": notes, "hours": [h for _, h in runs]}


# ---------------------------------------------------------------------------
# Calibration


def calibrate(mix: Mixtures, hops_by_ebr, fa_hops, fa_hours: float, loaded, target: float) -> tuple[dict[str, float], dict]:
    """Per class: the lowest grid threshold with false alarms/hour <= target on the negatives.

    The lowest such threshold keeps the most recall. If none reaches the target, the threshold
    with the fewest false alarms (then the best 0 dB F1) is taken and the miss is reported.
    """
    labels = list(loaded.labels)
    table: dict[str, list[dict]] = {label: [] for label in labels}
    for t in THRESHOLD_GRID:
        th = {label: float(t) for label in labels}
        fa = replay(fa_hops, loaded, th)
        n_fa = {label: sum(1 for e in fa if e.label == label) for label in labels}
        counts, _ = event_based(mix.refs[0.0], replay(hops_by_ebr[0.0], loaded, th), labels)
        counts_m6, _ = event_based(mix.refs[-6.0], replay(hops_by_ebr[-6.0], loaded, th), labels)
        for label in labels:
            table[label].append({"threshold": float(t), "fa_per_hour": n_fa[label] / fa_hours,
                                 "f1_0db": counts[label].metrics()["f1"],
                                 "recall_-6db": counts_m6[label].metrics()["recall"]})
    chosen, notes = pick_thresholds(table, target, " on the calibration half")
    return chosen, {"sweep": table, "notes": notes}


def pick_thresholds(table: dict[str, list[dict]], target: float, where: str = "") -> tuple[dict[str, float], dict[str, str]]:
    """`pick_threshold` for every class of a sweep table: (thresholds, notes on the classes that miss the target)."""
    chosen: dict[str, float] = {}
    notes: dict[str, str] = {}
    for label, rows in table.items():
        row, reached = pick_threshold(rows, target)
        chosen[label] = row["threshold"]
        if not reached:
            notes[label] = f"target not reached{where}: {row['fa_per_hour']:.2f} FA/h at best"
    return chosen, notes


def pick_threshold(rows: Sequence[dict], target: float) -> tuple[dict, bool]:
    """The sweep row (ascending thresholds) of the lowest threshold with false alarms/hour <= target,
    and True; if none reaches the target, the row with the fewest false alarms (then the best F1), and False."""
    ok = [row for row in rows if row["fa_per_hour"] <= target]
    if ok:
        return ok[0], True
    return min(rows, key=lambda r: (r["fa_per_hour"], -np.nan_to_num(r["f1_0db"]))), False


def calibrate_on(events: Sequence[EventClip], negatives: Sequence[tuple[data.Clip, np.ndarray]], loaded, seed: int,
                 target: float) -> tuple[dict[str, float], dict, float]:
    """`calibrate` on the hops the model scores for these events (0 and -6 dB mixtures) and negatives.

    Returns (thresholds, info, hours of negatives); ValueError when there are no events or no negatives.
    """
    mix = build_mixtures(events, negatives, seed, ebrs=(0.0, -6.0))
    hops_by_ebr = {ebr: run_streams(s, loaded, keep_hops=True)[1] for ebr, s in mix.streams.items()}
    fa_s, _ = fa_streams(negatives, seed)
    _, fa_hops = run_streams(fa_s, loaded, keep_hops=True)
    fa_hours = sum(len(x) for x in fa_s) / loaded.frontend.sample_rate / 3600
    if fa_hours == 0 or not events:
        raise ValueError("has no negatives or no events")
    thresholds, info = calibrate(mix, hops_by_ebr, fa_hops, fa_hours, loaded, target)
    return thresholds, info, fa_hours


# ---------------------------------------------------------------------------
# Report


def _fmt(v: float) -> str:
    return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.3f}"


def markdown(result: dict, labels: Sequence[str]) -> str:
    """The human-readable tables printed at the end (also pasted into the model card)."""
    lines = []
    mixr = result["mixtures"]
    lines.append("| class | EBR dB | precision | recall | F1 | ER | refs | insertions |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label in labels:
        for ebr, r in mixr["per_ebr"].items():
            m = r["classes"][label]
            lines.append(f"| {label} | {ebr} | {_fmt(m['precision'])} | {_fmt(m['recall'])} | {_fmt(m['f1'])} | "
                         f"{_fmt(m['error_rate'])} | {m['n_ref']} | {m['insertions']} |")
    lines.append("")
    lines.append("| EBR dB | F1 (class mean) | ER (class mean) |")
    lines.append("|---:|---:|---:|")
    for ebr, r in mixr["per_ebr"].items():
        lines.append(f"| {ebr} | {_fmt(r['f1_macro'])} | {_fmt(r['error_rate_macro'])} |")
    lines.append("")
    fa = result["false_alarms"]
    lines.append(f"False alarms on {fa['hours']:.2f} h of validation negatives (no events):")
    lines.append("")
    lines.append("| class | false alarms | per hour | main causes |")
    lines.append("|---|---:|---:|---|")
    for label in labels:
        causes = ", ".join(f"{k} x{v}" for k, v in list(fa["causes"][label].items())[:4])
        lines.append(f"| {label} | {fa['false_alarms'][label]} | {fa['per_hour'][label]:.2f} | {causes} |")
    lines.append("")
    lines.append("Operating curve (thresholds swept on these same negatives, so not a calibrated result): the best "
                 "share alerted at 0 dB (with -6 dB) among thresholds within a false-alarm rate:")
    lines.append("")
    limits = list(result["operating_curve"]["best_within_fa_per_hour"])
    lines.append("| class | " + " | ".join(f"<= {lim} FA/h: alerted 0 / -6 dB (threshold)" for lim in limits) + " |")
    lines.append("|---|" + "---:|" * len(limits))
    for label in labels:
        cells = []
        for lim in limits:
            r = result["operating_curve"]["best_within_fa_per_hour"][lim][label]
            cells.append("none" if r is None else
                         f"{100 * r['alerted_+0db']:.0f} / {100 * r['alerted_-6db']:.0f} % ({r['threshold']:g})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| class / source | recall (all EBRs) | events |")
    lines.append("|---|---:|---:|")
    for key, v in mixr["recall_by_source"].items():
        lines.append(f"| {key} | {_fmt(v['recall'])} | {v['n']} |")
    return "\n".join(lines)


def _plain(obj):
    """JSON-safe copy: NaN becomes null, numpy scalars become Python numbers, dict keys strings."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return None if not np.isfinite(obj) else round(float(obj), 6)
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def evaluate_model(path: str, items_by_split: dict, args) -> dict:
    """Calibrate (optionally) and evaluate one checkpoint on the chosen split; returns the result dict."""
    from earshot.model.checkpoint import load_checkpoint

    loaded = load_checkpoint(path)
    labels = list(loaded.labels)
    result: dict = {
        "model": str(path),
        "model_provenance": {k: loaded.provenance.get(k) for k in ("git_commit", "date", "steps", "seed", "command")},
        "cascade": loaded.confirmer is not None,
        "split": args.split,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data_index_sha256": data.index_sha256(args.data),
        "collar_s": COLLAR_S,
        "metric": "DCASE 2017 task 2 event-based, onset only, 0.5 s collar; ER = (deletions + insertions) / references "
                  f"per class; alerted = a detection of the class starting within {ALERT_SLACK_S} s of the event",
    }
    if args.split == "source":
        heldout, gval = items_by_split["heldout"], items_by_split["group"]
        halves = source_halves([c for c, _ in heldout])
        if args.calibrate:
            cal_negs = [(c, x) for c, x in heldout if c.label == data.NEGATIVE and halves[c.group] == "cal"]
            gval_negs = [(c, x) for c, x in gval if c.label == data.NEGATIVE]
            min_threshold = 0.0
            if loaded.confirmer is not None:  # below its trigger stage 1 alone would decide: keep thresholds above it
                trig, rates = choose_trigger([cal_negs, gval_negs], loaded, args.seed, args.max_confirm_per_hour)
                loaded.confirmer.set_triggers({label: trig for label in loaded.confirmer.triggers})
                min_threshold = trig
                result["trigger"] = {"chosen": trig, "confirmer_calls_per_hour": rates,
                                     "max_calls_per_hour": args.max_confirm_per_hour}
                log.info("cascade trigger %.2f (confirmer calls/hour by trigger: %s)", trig, rates)
            thresholds, info = calibrate_negatives([cal_negs, gval_negs], loaded, args.seed, args.target_fa_per_hour,
                                                   min_threshold)
            _save_thresholds(path, loaded, thresholds, info, args, result,
                             "lowest threshold with FA/h <= target on both the calibration third of the held-out-source "
                             "negatives and the group-validation negatives of the training sources")
            loaded = load_checkpoint(path)
        events, negatives = half_parts(heldout, halves, "report", loaded)
        result["reported_on"] = ("held-out sources: every event; negatives of the report two thirds "
                                 "(the other third only sets thresholds)")
    else:
        items = items_by_split["group"]
        halves = calibration_halves([c for c, _ in items])
        report_half = None
        if args.calibrate:
            ev_cal, neg_cal = half_parts(items, halves, "cal", loaded)
            thresholds, info, _ = calibrate_on(ev_cal, neg_cal, loaded, args.seed, args.target_fa_per_hour)
            _save_thresholds(path, loaded, thresholds, info, args, result,
                             "lowest threshold with FA/h <= target on the calibration half of the validation groups")
            loaded = load_checkpoint(path)
            report_half = "report"
        events, negatives = half_parts(items, halves, report_half, loaded)
        result["reported_on"] = "report half of the validation groups" if report_half else "all validation groups"
    result["thresholds"] = dict(loaded.thresholds)
    log.info("%s: evaluating on %s: %d events, %d negatives", path, result["reported_on"], len(events), len(negatives))
    mix = build_mixtures(events, negatives, args.seed)
    est_by_ebr, hops_by_ebr = {}, {}
    for ebr, streams in mix.streams.items():
        est_by_ebr[ebr], hops_by_ebr[ebr] = run_streams(streams, loaded, keep_hops=True)
    result["mixtures"] = mixture_report(mix, est_by_ebr, labels)
    result["mixtures"]["streams_per_ebr"] = len(mix.streams[EBRS_DB[0]])
    result["mixtures"]["alerted_by_ebr"] = {f"{ebr:+.0f}": alerted(mix.refs[ebr], est_by_ebr[ebr], labels)
                                            for ebr in mix.refs}
    result["mixtures"]["onsets_0db"] = onset_stats(mix.refs[0.0], est_by_ebr[0.0], labels)
    fa_s, fa_spans = fa_streams(negatives, args.seed)
    calls1 = loaded.confirmer.calls if loaded.confirmer is not None else 0
    fa_est, fa_hops = run_streams(fa_s, loaded, keep_hops=True)
    result["false_alarms"] = fa_report(fa_est, fa_s, fa_spans, labels)
    result["operating_curve"] = operating_curve(mix.refs, hops_by_ebr, fa_hops, result["false_alarms"]["hours"], loaded)
    if loaded.confirmer is not None:
        result["confirmer_calls_per_hour_on_negatives"] = (loaded.confirmer.calls - calls1) / result["false_alarms"]["hours"]
    result["markdown"] = markdown(result, labels)
    return result


def _save_thresholds(path, loaded, thresholds, info, args, result, method: str) -> None:
    """Re-save the checkpoint with calibrated thresholds (its confirm section kept)."""
    from earshot.model.checkpoint import save_checkpoint

    log.info("calibrated thresholds: %s", thresholds)
    for label, note in info["notes"].items():
        log.warning("%s: %s", label, note)
    prov = dict(loaded.provenance)
    prov["calibration"] = {"target_fa_per_hour": args.target_fa_per_hour, "thresholds": thresholds,
                           "notes": info["notes"], "date": result["date"], "split": args.split, "method": method}
    save_checkpoint(path, loaded.model, list(loaded.labels), loaded.frontend, thresholds, prov, confirm=loaded.confirmer)
    result["calibration"] = {"thresholds": thresholds, "target_fa_per_hour": args.target_fa_per_hour,
                             "notes": info["notes"], "sweep": info["sweep"], "method": method}


def summary_table(results: Sequence[dict]) -> str:
    """One row per (model, split): alerted at 0 / -6 dB, onset F1 at 0 dB and false alarms/hour, per class."""
    labels = list(results[0]["thresholds"]) if results else []
    head = ["model", "split"] + [f"{lab} {what}" for lab in labels for what in ("alerted 0 dB", "alerted -6 dB", "F1 0 dB", "FA/h")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (4 * len(labels))]
    for r in results:
        al, f1 = r["mixtures"]["alerted_by_ebr"], r["mixtures"]["per_ebr"]
        cells = [Path(r["model"]).name, r["split"]]
        for lab in labels:
            cells += [f"{100 * al['+0'][lab]:.0f} %", f"{100 * al['-6'][lab]:.0f} %",
                      _fmt(f1["+0"]["classes"][lab]["f1"]), f"{r['false_alarms']['per_hour'][lab]:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Onsets at 0 dB (alerted events): median onset error / 90th percentile of |error| (s) / repeats per event", "",
              "| model | split | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for r in results:
        o = r["mixtures"]["onsets_0db"]
        lines.append(f"| {Path(r['model']).name} | {r['split']} | " + " | ".join(
            f"{_fmt(o[lab]['median_onset_error_s'])} / {_fmt(o[lab]['p90_abs_onset_error_s'])} / "
            f"{_fmt(o[lab]['repeats_per_event'])}" for lab in labels) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--data", default=str(data.default_data_dir()), help="data folder with index.csv")
    ap.add_argument("--model", "--models", dest="models", nargs="+", default=["models/earshot.pt"],
                    help="checkpoints to evaluate (one summary table at the end)")
    ap.add_argument("--split", choices=("source", "group", "both"), default="both",
                    help="source: held-out sources never trained on; group: validation groups of the training sources")
    ap.add_argument("--heldout-sources", default=None,
                    help="comma-separated held-out sources (default: data.HELDOUT_SOURCES, as tools/train.py holds out)")
    ap.add_argument("--calibrate", action="store_true", help="choose per-class thresholds and re-save the checkpoint(s)")
    ap.add_argument("--target-fa-per-hour", type=float, default=1.0, help="false alarms per hour per class to calibrate for")
    ap.add_argument("--max-confirm-per-hour", type=float, default=1200.0,
                    help="cascade: the lowest stage-1 trigger whose confirmer calls/hour on the calibration negatives "
                         "stay within this is chosen (bounds the CPU cost)")
    ap.add_argument("--json", default=None, help="write all results here")
    ap.add_argument("--seed", type=int, default=0, help="seed of the stream layout")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import torch

    from earshot.model import CheckpointError

    torch.set_num_threads(args.threads)
    t_start = time.monotonic()
    try:
        clips = data.read_index(args.data)
        _, gval, heldout = data.source_split(clips, heldout_sources=data.parse_sources(args.heldout_sources))
        if args.split in ("source", "both") and not heldout:
            raise data.DataError("no clip of the held-out sources is in the index (see --heldout-sources)")
        items_by_split = {"group": list(zip(gval, data.load_all(args.data, gval))),
                          "heldout": list(zip(heldout, data.load_all(args.data, heldout)))}
    except data.DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    splits = ("source", "group") if args.split == "both" else (args.split,)
    results = []
    for split in splits:  # source first: with --calibrate its thresholds are the ones kept
        for path in args.models:
            run_args = argparse.Namespace(**{**vars(args), "split": split,
                                             "calibrate": args.calibrate and split == splits[0]})
            try:
                res = evaluate_model(path, items_by_split, run_args)
            except (CheckpointError, ValueError) as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                return 2
            print(f"\n## {path}: {res['reported_on']}\n\n{res['markdown']}")
            results.append(res)
    table = summary_table(results)
    print("\n" + table)
    if args.json:
        out = {"results": results, "summary": table, "wall_time_s": round(time.monotonic() - t_start, 1)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(_plain(out), indent=1, allow_nan=False) + "\n")
        log.info("wrote %s", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
