"""Publishers: send each detection event to MQTT, ZeroMQ and/or stdout.

Every publisher implements the small `Publisher` protocol. The worker threads (one per
audio source) call `publish()` concurrently, so every publisher is thread-safe, never
blocks for long and never raises on transport trouble: it logs and counts instead.
An event is serialized once (`Event.to_json`) by `Fanout` and the same bytes go to
every transport.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any, Protocol, runtime_checkable

from earshot.events import Event

log = logging.getLogger(__name__)

__all__ = ["Fanout", "PublishError", "Publisher", "make_publishers", "payload_of", "topic_part"]


class PublishError(Exception):
    """A publisher cannot be set up (bad endpoint, port in use, unreadable password file).

    The message is one line meant for the user, e.g. "cannot bind ZeroMQ to tcp://...".
    """


@runtime_checkable
class Publisher(Protocol):
    """One transport that events are sent over."""

    name: str
    """Short transport name used in logs and counters (`mqtt`, `zmq`, `stdout`)."""
    published: int
    """Events handed to the transport successfully (for MQTT: acknowledged by the broker)."""
    dropped: int
    """Events given up on (queue overflow, transport error)."""

    def publish(self, event: Event, payload: bytes | None = None) -> None:
        """Send `event`; `payload` is its `to_json()` UTF-8 bytes if already computed."""

    def close(self, timeout_s: float = 2.0) -> None:
        """Flush what can be flushed within `timeout_s` seconds, then release the transport."""


def payload_of(event: Event, payload: bytes | None) -> bytes:
    """The event's wire bytes: `payload` when the caller already serialized it, else `to_json()`."""
    return payload if payload is not None else event.to_json().encode("utf-8")


def topic_part(name: str, forbidden: str = "/+#\0") -> str:
    """`name` made safe as one topic level: each character of `forbidden` becomes `_`.

    The default suits MQTT: `/` would add topic levels and `+`, `#` are wildcards that
    paho refuses to publish. ZeroMQ passes `.`, its topic segment separator.
    """
    return "".join("_" if c in forbidden else c for c in name) or "_"


class Fanout:
    """Sends each event to several publishers, isolating their failures from each other.

    The event is serialized once here. An exception from one publisher (which would be
    a bug: publishers log and count transport trouble themselves) is logged once per
    publisher and counted as a drop; the other publishers still get the event.
    """

    def __init__(self, publishers: list[Publisher]) -> None:
        self.publishers = list(publishers)
        self._lock = threading.Lock()
        self._errors: dict[str, int] = {p.name: 0 for p in self.publishers}

    def publish(self, event: Event) -> None:
        """Serialize `event` once and hand it to every publisher; never raises."""
        try:
            payload = event.to_json().encode("utf-8")
        except (TypeError, ValueError):
            log.exception("cannot serialize event %r", event)
            with self._lock:
                for name in self._errors:
                    self._errors[name] += 1
            return
        for p in self.publishers:
            try:
                p.publish(event, payload)
            except Exception:  # noqa: BLE001 - isolate one transport's bug from the others
                with self._lock:
                    first = self._errors[p.name] == 0
                    self._errors[p.name] += 1
                if first:
                    log.exception("%s publisher failed; further failures are only counted", p.name)

    def stats(self) -> dict[str, dict[str, Any]]:
        """Counters per transport: `published`, `dropped` (including publisher exceptions)."""
        with self._lock:
            errors = dict(self._errors)
        out: dict[str, dict[str, Any]] = {}
        for p in self.publishers:
            extra = p.stats() if hasattr(p, "stats") else {}
            out[p.name] = {**extra, "published": p.published, "dropped": p.dropped + errors[p.name]}
        return out

    def close(self, timeout_s: float = 2.0) -> None:
        """Close every publisher, sharing `timeout_s` seconds between them; never raises."""
        deadline = time.monotonic() + timeout_s
        for p in self.publishers:
            try:
                p.close(max(0.0, deadline - time.monotonic()))
            except Exception:  # noqa: BLE001 - one failing close must not leak the others
                log.exception("closing the %s publisher failed", p.name)


def make_publishers(config: Any) -> list[Publisher]:
    """The enabled publishers for a `earshot.config.Config`.

    Raises `PublishError` (one clear line) when one cannot be set up; the ones already
    created are closed first so no socket or thread leaks.
    """
    # Imported here so that `earshot.publish` stays importable without paho or pyzmq.
    made: list[Publisher] = []
    try:
        if config.zmq.enabled:
            from earshot.publish.zmq import ZmqPublisher

            made.append(ZmqPublisher(config.zmq))
        if config.mqtt.enabled:
            from earshot.publish.mqtt import MqttPublisher

            made.append(MqttPublisher(config.mqtt, node=config.node, state_dir=getattr(config, "state_dir", None)))
        if config.stdout.enabled:
            from earshot.publish.stdout import StdoutPublisher

            made.append(StdoutPublisher())
    except BaseException:
        for p in made:
            p.close(0.5)
        raise
    return made
