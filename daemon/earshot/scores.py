"""The ZeroMQ score feed: every hop's class scores, thresholds, level and spectrogram column.

Topic `scores.<source>` on the events' PUB socket (`[zmq] scores = true`), payload one JSON object:

    {"schema": "earshot.scores/1", "node": "attic", "source": "mic0", "t_end": 12.3,
     "time": "2024-05-01T12:00:03.250Z", "level_dbfs": -41.2, "labels": ["alarm", "glass_break", "gunshot"],
     "scores": [0.01, 0.93, 0.0], "thresholds": [0.99, 0.95, 0.9], "mel": [-3.12, ...], "gate_dbfs": -75.0}

`t_end` is the end of the scored window in stream seconds, `time` its wall-clock time; `thresholds`
are the current start thresholds (null for a label that is not reported); `mel` is the mean
log-mel column of the hop (n_mels values, 2 decimals); `gate_dbfs` the level gate in force
(`detect.min_level_dbfs`: quieter hops score zero). `earshot monitor` consumes exactly this.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np

from .analyzer import Hop
from .events import Event, iso_utc
from .publish import topic_part

log = logging.getLogger(__name__)

SCHEMA = "earshot.scores/1"
"""Schema name and major version of the score messages."""

TOPIC_PREFIX = "scores."
"""Prefix of the score feed's topic frames; subscribe to it (or `scores.<source>`)."""


def scores_topic(source: str) -> bytes:
    """`scores.<source>` as bytes."""
    return f"{TOPIC_PREFIX}{topic_part(source, '.')}".encode("utf-8")


def scores_payload(*, node: str, source: str, hop: Hop, wall_s: float, labels: list[str],
                   thresholds: dict[str, float], gate_dbfs: float | None = None) -> dict:
    """One score message as a dict (the wire format above)."""
    return {
        "schema": SCHEMA,
        "node": node,
        "source": source,
        "t_end": round(float(hop.t_end), 3),
        "time": iso_utc(wall_s),
        "level_dbfs": round(float(hop.level_dbfs), 2),
        "labels": list(labels),
        "scores": [round(float(s), 4) for s in np.asarray(hop.scores).reshape(-1)],
        "thresholds": [round(float(thresholds[lab]), 4) if lab in thresholds else None for lab in labels],
        "mel": [round(float(m), 2) for m in np.asarray(hop.mel).reshape(-1)],
        **({} if gate_dbfs is None else {"gate_dbfs": round(float(gate_dbfs), 2)}),
    }


class ScoreFeed:
    """Sends one score message per hop through the ZeroMQ publisher; a service tap.

    Only while someone subscribes to `scores.`: otherwise the worker neither calls it nor
    computes spectrogram columns, and no JSON is built.
    """

    wants_audio = False

    @property
    def wants_hops(self) -> bool:
        """Whether a subscriber listens to the score topics now."""
        has = getattr(self.zmq, "has_subscriber", None)
        return True if has is None else bool(has(TOPIC_PREFIX.encode()))

    wants_mel = wants_hops

    def __init__(self, zmq_publisher: Any, service: Any) -> None:
        """`zmq_publisher` needs `send(topic, payload)`; `service` gives the streams and labels."""
        self.zmq = zmq_publisher
        self.service = service
        self.node = service.config.node
        self.labels = list(service.loaded.labels)
        self.sent = 0
        """Messages handed to the socket."""
        self.failed = 0
        """Messages not sent (socket full or closed)."""

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Tap: nothing to do per block."""

    def on_hop(self, source: str, hop: Hop) -> None:
        """Tap: publish this hop's scores."""
        stream = self.service.stream(source)
        if stream is None:
            return
        analyzer = stream.analyzer
        wall = analyzer.detector.to_wall(hop.t_end)
        msg = scores_payload(node=self.node, source=source, hop=hop, wall_s=wall, labels=self.labels,
                             thresholds=analyzer.detector.thresholds, gate_dbfs=analyzer.min_level_dbfs)
        if self.zmq.send(scores_topic(source), json.dumps(msg, separators=(",", ":")).encode("utf-8")):
            self.sent += 1
        else:
            self.failed += 1

    def on_event(self, event: Event) -> Event:
        """Tap: events pass unchanged."""
        return event
