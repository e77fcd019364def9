"""The one Event type every transport sends, with its versioned JSON schema.

An event is serialized once (`Event.to_json`) and the same bytes go to MQTT, ZeroMQ
and stdout, so a consumer can switch transports without changing its parser.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone

SCHEMA = "earshot.event/1"
"""Schema name and major version: bumped only for incompatible changes."""

START = "start"
END = "end"
EVENT_TYPES = (START, END)


def new_event_id() -> str:
    """A unique id shared by the start and end messages of one detection."""
    return uuid.uuid4().hex


def iso_utc(unix_s: float) -> str:
    """Unix seconds as an ISO 8601 UTC timestamp with milliseconds."""
    return datetime.fromtimestamp(unix_s, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Event:
    """A detection starting or ending on one source."""

    type: str
    """`start` when a detection is confirmed, `end` when it has not been heard for `hold_s`."""
    id: str
    """Unique detection id (hex); `start` and `end` of one detection share it, so consumers can pair and de-duplicate."""
    label: str
    """Class name, e.g. `glass_break`."""
    source: str
    """Name of the configured source that heard it."""
    node: str
    """Name of the machine running earshot (config `node`, default the host name)."""
    onset: float
    """Estimated start of the sound (seconds since the source started)."""
    offset: float | None
    """Estimated end of the sound (seconds since the source started); null on `start`."""
    onset_time: str
    """Wall-clock time of `onset` (ISO 8601, UTC)."""
    offset_time: str | None
    """Wall-clock time of `offset` (ISO 8601, UTC); null on `start`."""
    score: float
    """Peak class score so far (0..1)."""
    schema: str = field(default=SCHEMA)
    """Always `earshot.event/1` for this version of the format."""
    clip: str | None = None
    """Id of the evidence clip of this detection (`GET /clips/<clip>.flac` on the web server); the key is
    left out of the JSON when no clip is recorded, so the payload stays as it was before clips existed."""

    def __post_init__(self) -> None:
        if self.type not in EVENT_TYPES:
            raise ValueError(f"event type must be one of {EVENT_TYPES}, not {self.type!r}")
        # numpy scalars are not JSON serializable and NaN is not valid JSON: normalise once here.
        score = float(self.score)
        if not math.isfinite(score):
            raise ValueError(f"event score must be finite, not {score}")
        object.__setattr__(self, "score", round(score, 4))
        object.__setattr__(self, "onset", round(float(self.onset), 3))
        if self.offset is not None:
            object.__setattr__(self, "offset", round(float(self.offset), 3))

    def to_dict(self) -> dict:
        """The event as a plain dict, keys in schema order (`clip` only when set)."""
        d = asdict(self)
        if d["clip"] is None:
            del d["clip"]
        return d

    def to_json(self) -> str:
        """The event as one compact line of JSON: the payload on every transport."""
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: dict) -> Event:
        """Parse a dict produced by `to_dict`; unknown keys are ignored for forward compatibility."""
        if data.get("schema", SCHEMA).split("/")[0] != SCHEMA.split("/")[0]:
            raise ValueError(f"not an earshot event: schema {data.get('schema')!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> Event:
        """Parse one JSON payload produced by `to_json`."""
        return cls.from_dict(json.loads(text))
