"""The event state machine: confirmation, hysteresis, hold, refractory, onsets and offsets."""

import numpy as np
import pytest

from earshot.config import DetectConfig
from earshot.detect import RESPONSE_S, RISE_FRACTION, Detector, LabelRule, make_rules

pytestmark = pytest.mark.timeout(30)
LABELS = ["alarm", "glass_break", "gunshot"]
HOP, CHUNK = 0.1, 1.0


def _detector(cfg=DetectConfig(), thresholds=None):
    rules = make_rules(LABELS, thresholds or {k: 0.5 for k in LABELS}, cfg)
    return Detector(LABELS, rules, source="mic", node="pi", chunk_s=CHUNK, hop_s=HOP, to_wall=lambda t: 1e9 + t)


def _run(det, series):
    """series: list of per-hop score rows; hop k ends at (k+10)*HOP. Returns (t, event) pairs."""
    out = []
    for k, row in enumerate(series):
        t = round((k + 10) * HOP, 6)
        out += [(t, e) for e in det.update(t, np.asarray(row, dtype=np.float32))]
    return out


def _glass(values):
    return [[0.0, v, 0.0] for v in values]


def test_confirmation_needs_consecutive_hops():
    """One hop above threshold is not an event with confirm_hops=2; two in a row are."""
    assert _run(_detector(), _glass([0, 0.9, 0, 0.9, 0, 0])) == []
    # A 0.3 s sound at 1.0 s is in every window ending from 1.1 s to 2.3 s.
    events = _run(_detector(), _glass([0] + [0.9] * 13 + [0] * 12))
    assert [e.type for _, e in events] == ["start", "end"]
    start, end = events[0][1], events[1][1]
    assert start.id == end.id and start.label == "glass_break"
    assert start.onset == pytest.approx(1.1 - RESPONSE_S)  # first high window ends at 1.1 s
    assert end.offset == pytest.approx(2.3 - CHUNK + HOP)  # last high window ends at 2.3 s
    assert events[1][0] == pytest.approx(2.3 + 1.0)  # reported once unheard for hold_s
    assert end.score == pytest.approx(0.9)


def test_hysteresis_keeps_event_alive_and_hold_ends_it():
    """Scores between threshold*hysteresis and threshold keep an active event; it ends hold_s after the last."""
    det = _detector(DetectConfig(hysteresis=0.7, hold_s=0.5, confirm_hops=1))
    events = _run(det, _glass([0.6, 0.4, 0.4, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3, 0.3]))
    kinds = [(round(t, 2), e.type) for t, e in events]
    # 0.4 >= 0.35 keeps it alive until 1.3 s; the end comes at the first hop >= 0.5 s later.
    assert kinds == [(1.0, "start"), (1.8, "end")]


def test_refractory_suppresses_retrigger():
    """After an end, the same label cannot start again within refractory_s; other labels can."""
    det = _detector(DetectConfig(confirm_hops=1, hold_s=0.2, refractory_s=1.0))
    series = [[0, 0.9, 0]] + [[0, 0, 0]] * 2 + [[0.9, 0.9, 0]] + [[0, 0, 0]] * 3 + [[0, 0.9, 0]] * 2
    kinds = [(round(t, 2), e.label, e.type) for t, e in _run(det, series)]
    assert kinds == [(1.0, "glass_break", "start"), (1.2, "glass_break", "end"), (1.3, "alarm", "start"),
                     (1.5, "alarm", "end")]
    series = [[0, 0.9, 0]] + [[0, 0, 0]] * 14 + [[0, 0.9, 0]]
    kinds = [(e.label, e.type) for _, e in _run(_detector(DetectConfig(confirm_hops=1, hold_s=0.2, refractory_s=1.0)),
                                                    series)]
    assert kinds == [("glass_break", "start"), ("glass_break", "end"), ("glass_break", "start")]


def test_flush_ends_active_events_and_labels_filter():
    """flush() closes events still active; labels not in DetectConfig.labels never fire."""
    det = _detector(DetectConfig(confirm_hops=1, labels=("gunshot",)))
    events = _run(det, [[0.9, 0.9, 0.9]] * 3)
    assert [(e.label, e.type) for _, e in events] == [("gunshot", "start")]
    ends = det.flush(2.0)
    assert [(e.label, e.type) for e in ends] == [("gunshot", "end")]
    assert det.active_labels == []


def test_config_threshold_overrides_model():
    """[detect] thresholds override the model's calibrated thresholds; others keep the model's."""
    rules = make_rules(LABELS, {"alarm": 0.3, "glass_break": 0.4, "gunshot": 0.5},
                       DetectConfig(thresholds={"gunshot": 0.8}, hysteresis=0.5))
    assert rules["gunshot"] == LabelRule(0.8, 0.4, 2, 1.0, 1.0)
    assert rules["alarm"].threshold == 0.3


def test_wall_clock_fields():
    """Events carry ISO UTC wall times; the end repeats the start's onset time exactly, even with a
    live clock that moves between the two messages."""
    clock = iter(range(1_000_000_000, 1_000_001_000))
    rules = make_rules(LABELS, {k: 0.5 for k in LABELS}, DetectConfig(confirm_hops=1, hold_s=0.1))
    det = Detector(LABELS, rules, source="mic", node="pi", chunk_s=CHUNK, hop_s=HOP,
                   to_wall=lambda t: next(clock) + t)
    events = _run(det, _glass([0.9, 0, 0]))
    start, end = events[0][1], events[1][1]
    assert start.onset_time.endswith("Z") and end.offset_time is not None
    assert end.onset_time == start.onset_time


def test_set_threshold_at_run_time():
    """A threshold changed at run time applies from the next hop, exit threshold included."""
    det = _detector(DetectConfig(confirm_hops=1))
    det.set_threshold("glass_break", 0.95, 0.7)
    assert det.thresholds["glass_break"] == 0.95
    assert _run(det, _glass([0.9, 0.9])) == []
    with pytest.raises(KeyError):
        det.set_threshold("dog", 0.5, 0.7)


def test_onset_dated_from_the_rise():
    """Scores climbing through half the threshold before crossing it date the onset from the start of
    the climb, not from the crossing (otherwise slowly building sounds are reported late); the
    hysteresis does not move where the climb starts."""
    assert RISE_FRACTION == 0.5
    det = _detector(DetectConfig(confirm_hops=2, hysteresis=0.9))
    events = _run(det, _glass([0.1, 0.3, 0.4, 0.6, 0.7] + [0.8] * 5 + [0] * 20))
    start = events[0][1]
    assert start.onset == pytest.approx(1.1 - RESPONSE_S)  # the climb began at the window ending at 1.1 s
    det = _detector(DetectConfig(confirm_hops=2, hysteresis=0.5))
    events = _run(det, _glass([0.3, 0.1, 0.1, 0.6, 0.7] + [0.8] * 5 + [0] * 20))  # an interrupted climb
    assert events[0][1].onset == pytest.approx(1.3 - RESPONSE_S)
    det = _detector(DetectConfig(confirm_hops=2))
    events = _run(det, _glass([0.2, 0.26, 0.3, 0.6, 0.7] + [0.8] * 5 + [0] * 20))  # 0.2 < 0.25 <= 0.26
    assert events[0][1].onset == pytest.approx(1.1 - RESPONSE_S)
