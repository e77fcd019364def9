"""Stdout publisher and Fanout: JSON lines that parse back, failure isolation, counters."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace

import pytest

from earshot.events import Event, iso_utc, new_event_id
from earshot.publish import Fanout, make_publishers
from earshot.publish.stdout import StdoutPublisher

pytestmark = pytest.mark.timeout(30)


def make_event(i: int, type_: str = "start") -> Event:
    end = type_ == "end"
    return Event(type=type_, id=new_event_id(), label="alarm", source="mic0", node="n", onset=float(i),
                 offset=i + 1.0 if end else None, onset_time=iso_utc(1_700_000_000 + i),
                 offset_time=iso_utc(1_700_000_001 + i) if end else None, score=0.75)


def test_lines_parse_back_to_the_same_events(capsys):
    """Each event is one stdout line whose JSON parses back to an equal Event."""
    pub = StdoutPublisher()
    events = [make_event(0), make_event(1, "end")]
    for e in events:
        pub.publish(e)
    lines = capsys.readouterr().out.splitlines()
    assert [Event.from_json(line) for line in lines] == events
    assert pub.published == 2 and pub.dropped == 0


def test_concurrent_writers_do_not_interleave_lines():
    """Lines from several worker threads stay whole."""
    out = io.StringIO()
    pub = StdoutPublisher(out)
    ts = [threading.Thread(target=lambda: [pub.publish(make_event(i)) for i in range(200)]) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(10)
    lines = out.getvalue().splitlines()
    assert len(lines) == 800 and all(Event.from_json(line).label == "alarm" for line in lines)


def test_closed_stream_is_counted_not_raised():
    """A closed stdout (e.g. the reader went away) is counted as dropped, never raised."""
    out = io.StringIO()
    out.close()
    pub = StdoutPublisher(out)
    pub.publish(make_event(0))
    assert (pub.published, pub.dropped) == (0, 1)


class Exploding:
    """A publisher with a bug: raises on every publish."""

    name = "broken"
    published = 0
    dropped = 0

    def publish(self, event, payload=None):
        raise RuntimeError("bug")

    def close(self, timeout_s=2.0):
        raise RuntimeError("bug in close")


def test_fanout_isolates_failures_and_serializes_once():
    """One failing publisher neither stops the others nor raises; every publisher gets the
    same bytes (serialized once); failures are counted per transport."""
    out = io.StringIO()
    seen: list[bytes] = []

    class Recorder(StdoutPublisher):
        def publish(self, event, payload=None):
            seen.append(payload)
            super().publish(event, payload)

    fan = Fanout([Exploding(), Recorder(out)])
    e = make_event(3)
    fan.publish(e)
    fan.publish(e)
    assert seen == [e.to_json().encode()] * 2
    assert [Event.from_json(line) for line in out.getvalue().splitlines()] == [e, e]
    stats = fan.stats()
    assert stats["broken"]["dropped"] == 2 and stats["stdout"]["published"] == 2
    fan.close(0.5)  # a failing close is logged, not raised


def test_make_publishers_builds_only_enabled_ones():
    """make_publishers follows the enabled flags (here: stdout only)."""
    cfg = SimpleNamespace(node="n", mqtt=SimpleNamespace(enabled=False), zmq=SimpleNamespace(enabled=False),
                          stdout=SimpleNamespace(enabled=True))
    pubs = make_publishers(cfg)
    assert [p.name for p in pubs] == ["stdout"]
