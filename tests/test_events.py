"""The Event type: one JSON form for every transport, round-trips, rejects what JSON cannot carry."""

import json

import numpy as np
import pytest

from earshot.events import SCHEMA, Event, new_event_id

pytestmark = pytest.mark.timeout(30)


def _event(**kw):
    base = dict(type="start", id=new_event_id(), label="glass_break", source="mic", node="pi", onset=1.23456,
                offset=None, onset_time="2026-11-24T06:00:00.000Z", offset_time=None, score=np.float32(0.91234))
    base.update(kw)
    return Event(**base)


def test_round_trip_and_schema():
    """to_json -> from_json gives the same event; numpy scores become plain floats; the schema is stamped."""
    e = _event()
    data = json.loads(e.to_json())
    assert data["schema"] == SCHEMA and data["score"] == 0.9123 and data["onset"] == 1.235
    assert list(data) == ["type", "id", "label", "source", "node", "onset", "offset", "onset_time",
                          "offset_time", "score", "schema"]
    assert Event.from_json(e.to_json()) == e


def test_rejects_bad_values():
    """NaN scores and unknown types are refused at construction, not on the wire."""
    with pytest.raises(ValueError):
        _event(score=float("nan"))
    with pytest.raises(ValueError):
        _event(type="blip")
    with pytest.raises(ValueError):
        Event.from_dict({**json.loads(_event().to_json()), "schema": "other/1"})


def test_unknown_fields_ignored():
    """A newer minor version that adds fields still parses."""
    data = json.loads(_event().to_json())
    data["extra"] = 1
    assert Event.from_dict(data).label == "glass_break"


def test_ids_unique():
    assert len({new_event_id() for _ in range(1000)}) == 1000
