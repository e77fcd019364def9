"""MQTT publisher (paho-mqtt 2.x): events, retained per-label state and availability.

Topics (`<p>` = `topic_prefix`):
- `<p>/<node>/<source>/event`: the event JSON, QoS `qos`, not retained.
- `<p>/<node>/<source>/<label>`: retained `ON` on start, `OFF` on end (home-automation state).
- `<p>/<node>/status`: retained `online` on every (re)connect, `offline` on clean close,
  and `offline` as the last will when the process dies.

Delivery while the broker is away: messages wait in our own bounded FIFO (`queue_limit`,
oldest dropped and counted when full) and one sender thread hands them to paho only
while connected, at most `_WINDOW` unacknowledged at a time. Why not just call paho's
`publish()` while disconnected: paho does keep QoS>0 messages then (rc NO_CONN), but its
`max_queued_messages` refuses the *newest* message when full, and after a reconnect paho
resends its unacknowledged messages only after `on_connect` has run, so anything
published from `on_connect` would overtake them. Our sender therefore waits, after a
reconnect with messages still unacknowledged, for the first acknowledgement (which paho
can only process after its resend pass) before handing over more. That keeps strict
order, which matters for the retained ON/OFF state.
"""

from __future__ import annotations

import collections
import logging
import os
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from earshot.events import START, Event
from earshot.publish import PublishError, payload_of, topic_part

log = logging.getLogger(__name__)

PASSWORD_ENV = "EARSHOT_MQTT_PASSWORD"
"""Environment variable holding the MQTT password when `password_file` is not set."""

_WINDOW = 20
"""Messages handed to paho and not yet acknowledged, at most (also paho's max in-flight)."""

_EVENT, _STATE, _STATUS = "event", "state", "status"

_HINTS = {
    "not authorized": " (check username/password)",
    "bad user name or password": " (check username/password)",
    "client identifier not valid": " (check client_id)",
    "unsupported protocol version": ' (try protocol = "3.1.1")',
}


@dataclass(frozen=True)
class _Message:
    """One message waiting to be handed to paho."""

    topic: str
    payload: bytes
    retain: bool
    kind: str
    """`event`, `state` or `status`: only `event` messages count as published/dropped events."""


def _reason_text(reason: Any) -> str:
    """A paho reason code or error as lower-case text with a hint for the usual mistakes."""
    text = str(reason).strip().lower() or "unknown reason"
    return text + _HINTS.get(text, "")


def read_password(config: Any) -> str | None:
    """The password from `password_file` (first line) or `$EARSHOT_MQTT_PASSWORD`, or None."""
    if config.password_file:
        try:
            with open(config.password_file, encoding="utf-8") as f:
                return f.readline().rstrip("\r\n")
        except OSError as e:
            raise PublishError(f"cannot read MQTT password_file {config.password_file}: {e.strerror}") from None
    return os.environ.get(PASSWORD_ENV)


class MqttPublisher:
    """Publishes events to an MQTT broker without ever blocking the detection workers.

    `publish()` only appends to a bounded queue; a broker that is down at start, goes
    away or refuses us is logged once per state change and retried with backoff
    (1 s doubling to `reconnect_max_s`) by paho's network thread.
    """

    name = "mqtt"

    def __init__(self, config: Any, node: str) -> None:
        """Configure the client and start connecting in the background; raises `PublishError` on bad TLS/password files."""
        self._config = config
        self._qos = int(config.qos)
        self._limit = max(1, int(config.queue_limit))
        base = f"{config.topic_prefix}/{topic_part(node)}"
        self.status_topic = f"{base}/status"
        """Retained availability topic: `online` / `offline`."""
        self._base = base

        self._cond = threading.Condition()
        self._queue: collections.deque[_Message] = collections.deque()
        self._kinds: dict[int, _Message] = {}  # mid -> message handed to paho, not yet acknowledged
        self._early_acks: set[int] = set()  # acks that arrived before the sender recorded the mid
        self._outstanding = 0  # QoS>0 messages handed to paho and not yet acknowledged
        self._connected = False  # between on_connect (success) and on_disconnect
        self._ready = False  # connected and paho's resend pass is over: the sender may hand over
        self._closing = False
        self._stop_sender = False
        self._last_state: str | None = None  # last connection state logged, to log once per change
        self.connected = False
        """True while the broker has accepted our connection."""
        self.published = 0
        """Event messages acknowledged by the broker (QoS 0: written to the socket)."""
        self.dropped = 0
        """Event messages given up on (queue overflow, refused by the broker, invalid topic)."""
        self.dropped_other = 0
        """State and status messages given up on."""

        version = mqtt.MQTTv5 if str(config.protocol) == "5" else mqtt.MQTTv311
        client_id = config.client_id or f"earshot-{node}"
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=version
        )
        if config.username:
            self._client.username_pw_set(config.username, read_password(config))
        if config.tls:
            try:
                self._client.tls_set(ca_certs=config.ca_file, certfile=config.cert_file, keyfile=config.key_file)
            except (OSError, ssl.SSLError) as e:
                raise PublishError(f"cannot set up MQTT TLS (ca_file/cert_file/key_file): {e}") from None
        self._client.will_set(self.status_topic, "offline", qos=self._qos, retain=True)
        self._client.max_inflight_messages_set(_WINDOW)
        self._client.reconnect_delay_set(1, max(1, int(config.reconnect_max_s)))
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish

        self._sender = threading.Thread(target=self._send_loop, name="earshot-mqtt-send", daemon=True)
        self._sender.start()
        self._client.connect_async(config.host, int(config.port), keepalive=int(config.keepalive_s))
        self._client.loop_start()

    # ------------------------------------------------------------------ worker side

    def publish(self, event: Event, payload: bytes | None = None) -> None:
        """Queue the event message and its retained label state; returns at once, never raises."""
        source = f"{self._base}/{topic_part(event.source)}"
        self._enqueue(
            _Message(f"{source}/event", payload_of(event, payload), False, _EVENT),
            _Message(f"{source}/{topic_part(event.label)}", b"ON" if event.type == START else b"OFF", True, _STATE),
        )

    def _enqueue(self, *messages: _Message) -> None:
        with self._cond:
            for m in messages:
                if self._closing and m.kind != _STATUS:
                    self._count_drop(m)
                    continue
                if len(self._queue) >= self._limit:
                    oldest = self._queue.popleft()
                    if self.dropped + self.dropped_other == 0:
                        log.warning("MQTT queue full (%d messages): dropping the oldest", self._limit)
                    self._count_drop(oldest)
                self._queue.append(m)
            self._cond.notify_all()

    def _count_drop(self, m: _Message) -> None:
        # Caller holds self._cond.
        if m.kind == _EVENT:
            self.dropped += 1
        else:
            self.dropped_other += 1

    # ------------------------------------------------------------------ sender thread

    def _send_loop(self) -> None:
        """Hand queued messages to paho, in order, while connected and the window has room."""
        while True:
            with self._cond:
                while not self._stop_sender and not (self._ready and self._queue and self._outstanding < _WINDOW):
                    self._cond.wait()
                if self._stop_sender:
                    return
                m = self._queue.popleft()
                if self._qos > 0:
                    self._outstanding += 1
            try:
                info = self._client.publish(m.topic, m.payload, qos=self._qos, retain=m.retain)
            except ValueError as e:  # invalid topic or payload: retrying cannot help
                log.error("MQTT cannot publish on %r: %s", m.topic, e)
                with self._cond:
                    self._outstanding -= self._qos > 0
                    self._count_drop(m)
                continue
            with self._cond:
                if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # cannot happen with our window; be safe
                    self._outstanding -= self._qos > 0
                    self._queue.appendleft(m)
                    self._cond.wait(0.05)
                elif self._qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                    # paho forgets QoS 0 messages it could not write: keep it for the next connection.
                    self._queue.appendleft(m)
                    self._ready = False
                elif info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                    self._acked(m, success=True)
                else:
                    # QoS>0 and NO_CONN: paho keeps it and resends it after reconnecting.
                    self._kinds[info.mid] = m

    # ------------------------------------------------------------------ paho network thread

    def _acked(self, m: _Message, success: bool) -> None:
        # Caller holds self._cond.
        if not success:
            self._count_drop(m)
        elif m.kind == _EVENT:
            self.published += 1

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        with self._cond:
            m = self._kinds.pop(mid, None)
            if m is None:
                self._early_acks.add(mid)
            if self._qos > 0:
                self._outstanding -= 1
            failed = getattr(reason_code, "is_failure", False)
            if m is not None:
                self._acked(m, success=not failed)
            if failed:
                log.warning("MQTT broker rejected a message on %s: %s", m.topic if m else "?", _reason_text(reason_code))
            # The first acknowledgement after a reconnect proves paho's resend pass is over.
            if self._connected:
                self._ready = True
            self._cond.notify_all()

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if reason_code.is_failure:
            self._log_state(
                f"refused:{reason_code}",
                logging.ERROR,
                "MQTT broker refused the connection: %s",
                _reason_text(reason_code),
            )
            return
        with self._cond:
            self._connected = self.connected = True
            # With messages still unacknowledged, paho resends them right after this callback:
            # hand over nothing new until the first acknowledgement (see the module docstring).
            self._ready = self._outstanding == 0
            self._cond.notify_all()
        self._log_state("connected", logging.INFO, "MQTT connected to %s:%s", self._config.host, self._config.port)
        self._publish_now(_Message(self.status_topic, b"online", True, _STATUS))

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._log_state(
            "unreachable",
            logging.WARNING,
            "MQTT broker %s:%s unreachable; retrying (at most every %ss), events are queued meanwhile",
            self._config.host,
            self._config.port,
            self._config.reconnect_max_s,
        )

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = self._ready = self.connected = False
            closing = self._closing
        if was_connected and not closing:
            self._log_state("lost", logging.WARNING, "MQTT connection lost: %s; reconnecting", _reason_text(reason_code))

    def _publish_now(self, m: _Message) -> None:
        """Publish from the network thread (status on connect), outside the FIFO."""
        with self._cond:
            if self._qos > 0:
                self._outstanding += 1
        try:
            info = self._client.publish(m.topic, m.payload, qos=self._qos, retain=m.retain)
        except ValueError as e:
            log.error("MQTT cannot publish on %r: %s", m.topic, e)
            with self._cond:
                self._outstanding -= self._qos > 0
            return
        with self._cond:
            if self._qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._count_drop(m)
            elif info.mid in self._early_acks:
                self._early_acks.discard(info.mid)
            else:
                self._kinds[info.mid] = m

    def _log_state(self, state: str, level: int, msg: str, *args: Any) -> None:
        # Retries repeat the same failure every few seconds: log only when the state changes.
        if state != self._last_state:
            self._last_state = state
            log.log(level, msg, *args)

    # ------------------------------------------------------------------ owner side

    def stats(self) -> dict[str, Any]:
        """Counters and state: `connected`, `published`, `dropped`, `dropped_other`, `queued`, `in_flight`."""
        with self._cond:
            return {
                "connected": self.connected,
                "published": self.published,
                "dropped": self.dropped,
                "dropped_other": self.dropped_other,
                "queued": len(self._queue),
                "in_flight": self._outstanding,
            }

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish `offline`, wait up to `timeout_s` for queued and in-flight messages, disconnect."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._closing:
                return
        self._enqueue(_Message(self.status_topic, b"offline", True, _STATUS))
        with self._cond:
            self._closing = True
            while (self._queue or self._outstanding > 0) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            left = len(self._queue) + self._outstanding
            self._stop_sender = True
            self._cond.notify_all()
        if left:
            log.warning("MQTT: %d message(s) not delivered before shutdown", left)
        self._sender.join(max(0.1, deadline - time.monotonic()))
        self._client.disconnect()
        # loop_stop() joins paho's thread without a timeout; it can sit in a TCP connect
        # for up to its connect timeout, so stop it from a helper and wait a bounded time.
        stopper = threading.Thread(target=self._client.loop_stop, name="earshot-mqtt-stop", daemon=True)
        stopper.start()
        stopper.join(max(0.5, deadline - time.monotonic()))
        if stopper.is_alive():
            log.warning("MQTT network thread did not stop in time; leaving it to exit with the process")
        with self._cond:
            self.connected = self._connected = False
