"""MQTT publisher (paho-mqtt 2.x): events, retained per-label state, availability, and a channel
for the integrations (Home Assistant discovery, run-time control).

Topics (`<p>` = `topic_prefix`):
- `<p>/<node>/<source>/event`: the event JSON, QoS `qos`, not retained.
- `<p>/<node>/<source>/<label>`: retained `ON` on start, `OFF` on end (home-automation state).
- `<p>/<node>/status`: retained `online` on every (re)connect, `offline` on clean close,
  and `offline` as the last will when the process dies.

Delivery that loses nothing (at least once): events and their states go through a bounded
`earshot.spool.Spool`, on disk under `state_dir` (else in memory), and leave it only when the
broker has acknowledged them, so a broker outage or a daemon restart only delays them. The
session is persistent (MQTT 3.1.1 `clean_session=False`, MQTT 5 `clean_start=False` with a
session expiry), so the broker also keeps our control subscriptions while we are away.

One sender thread hands spooled messages to paho only while connected, at most `_WINDOW`
unacknowledged at a time. Why not just call paho's `publish()` while disconnected: paho does
keep QoS>0 messages then (rc NO_CONN), but only in memory, its `max_queued_messages` refuses
the *newest* message when full, and after a reconnect paho resends its unacknowledged messages
only after `on_connect` has run, so anything published from `on_connect` would overtake them.
Our sender therefore waits, after a reconnect with messages still unacknowledged, for the
first acknowledgement (which paho can only process after its resend pass) before handing over
more. That keeps strict order, which matters for the retained ON/OFF state.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from earshot.events import START, Event
from earshot.publish import PublishError, payload_of, topic_part
from earshot.spool import SPOOL_FILE, Entry, Spool

log = logging.getLogger(__name__)

PASSWORD_ENV = "EARSHOT_MQTT_PASSWORD"
"""Environment variable holding the MQTT password when `password_file` is not set."""

CREDENTIAL = "mqtt-password"
"""Name of the systemd credential with the MQTT password (`LoadCredential=mqtt-password:FILE`)."""

_WINDOW = 20
"""Messages handed to paho and not yet acknowledged, at most (also paho's max in-flight)."""

_EVENT, _STATE, _STATUS, _EXTRA = "event", "state", "status", "extra"

_HINTS = {
    "not authorized": " (check username/password)",
    "bad user name or password": " (check username/password)",
    "client identifier not valid": " (check client_id)",
    "unsupported protocol version": ' (try protocol = "3.1.1")',
}

MessageHandler = Callable[[str, bytes, bool], None]
"""Called in paho's network thread with (topic, payload, retained) for a subscribed message."""


@dataclass(frozen=True)
class _Sent:
    """A message handed to paho and not yet acknowledged."""

    topic: str
    kind: str
    qos: int
    entry: Entry | None
    """Its spool entry (forgotten on acknowledgement); None for messages sent outside the spool."""


def _reason_text(reason: Any) -> str:
    """A paho reason code or error as lower-case text with a hint for the usual mistakes."""
    text = str(reason).strip().lower() or "unknown reason"
    return text + _HINTS.get(text, "")


def read_password(config: Any) -> str | None:
    """The password, first found of: `password_file` (first line), the systemd credential
    `mqtt-password` (`LoadCredential=mqtt-password:...`), `$EARSHOT_MQTT_PASSWORD`; or None."""
    path = config.password_file
    if not path and os.environ.get("CREDENTIALS_DIRECTORY"):
        credential = Path(os.environ["CREDENTIALS_DIRECTORY"]) / CREDENTIAL
        path = str(credential) if credential.is_file() else None
    try:
        return password_from(path)
    except OSError as e:
        raise PublishError(f"cannot read MQTT password_file {path}: {e.strerror}") from None


def password_from(path: str | None) -> str | None:
    """The first line of `path`, or `$EARSHOT_MQTT_PASSWORD` when no path is given (None if unset);
    OSError when the file cannot be read. Shared by the daemon and `earshot tail`."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.readline().rstrip("\r\n")
    return os.environ.get(PASSWORD_ENV)


class MqttPublisher:
    """Publishes events to an MQTT broker without ever blocking the detection worker.

    `publish()` only appends to the spool; a broker that is down at start, goes away or
    refuses us is logged once per state change and retried with backoff (1 s doubling to
    `reconnect_max_s`) by paho's network thread.
    """

    name = "mqtt"

    def __init__(self, config: Any, node: str, state_dir: str | os.PathLike | None = None) -> None:
        """Configure the client, open the spool and start connecting in the background.

        Raises `PublishError` (one line) on unreadable TLS/password files or an unusable spool.
        """
        self._config = config
        self._qos = int(config.qos)
        self.base = f"{config.topic_prefix}/{topic_part(node)}"
        """`<prefix>/<node>`: the first two levels of every topic of this daemon."""
        self.status_topic = f"{self.base}/status"
        """Retained availability topic: `online` / `offline`."""

        self._cond = threading.Condition()
        path = Path(state_dir) / SPOOL_FILE if state_dir else None
        # A spool that cannot be opened (full state directory) starts in memory and retries the disk.
        self._spool = Spool(path, config.queue_limit, int(float(config.spool_max_mb) * 1_000_000))
        self._sent: dict[int, _Sent] = {}  # mid -> message handed to paho, not yet acknowledged
        self._early_acks: dict[int, bool] = {}  # mid -> failed, for acks that came before the mid was recorded
        self._outstanding = 0  # QoS>0 messages handed to paho and not yet acknowledged
        self._connected = False  # between on_connect (success) and on_disconnect
        self._ready = False  # connected and paho's resend pass is over: the sender may hand over
        self._closing = False
        self._stop_sender = False
        self._last_state: str | None = None  # last connection state logged, to log once per change
        self._subscriptions: list[tuple[str, MessageHandler]] = []
        self._connect_hooks: list[Callable[[], None]] = []
        self.connected = False
        """True while the broker has accepted our connection."""
        self.published = 0
        """Event messages acknowledged by the broker (QoS 0: written to the socket)."""
        self.dropped = 0
        """Event messages given up on (spool overflow, refused by the broker, invalid topic)."""
        self.dropped_other = 0
        """State and status messages given up on."""
        for entry in self._spool.evicted_at_open:
            self._count_drop(entry.kind)
        if self._spool.recovered:
            log.info("MQTT spool %s: %d message(s) from a previous run will be sent first", path,
                     self._spool.recovered)

        v5 = str(config.protocol) == "5"
        client_id = config.client_id or f"earshot-{node}"
        # A persistent session: the broker keeps our subscriptions and unacknowledged messages.
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311, clean_session=None if v5 else False,
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
        self._client.on_message = self._on_message

        self._sender = threading.Thread(target=self._send_loop, name="earshot-mqtt-send", daemon=True)
        self._sender.start()
        connect: dict[str, Any] = {"keepalive": int(config.keepalive_s)}
        if v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = int(config.session_expiry_s)
            connect.update(clean_start=False, properties=props)
        self._client.connect_async(config.host, int(config.port), **connect)
        self._client.loop_start()

    # ------------------------------------------------------------------ worker side

    def publish(self, event: Event, payload: bytes | None = None) -> None:
        """Spool the event message and its retained label state; returns at once, never raises."""
        source = f"{self.base}/{topic_part(event.source)}"
        self._enqueue(
            (f"{source}/event", payload_of(event, payload), False, _EVENT, True),
            (f"{source}/{topic_part(event.label)}", b"ON" if event.type == START else b"OFF", True, _STATE, True),
        )

    def publish_state(self, topic: str, payload: bytes) -> None:
        """Spool a retained state message in order with the events (e.g. every label `OFF` at start)."""
        self._enqueue((topic, payload, True, _STATE, False))

    def _enqueue(self, *messages: tuple[str, bytes, bool, str, bool]) -> None:
        with self._cond:
            for topic, payload, retain, kind, durable in messages:
                if self._closing and kind != _STATUS:
                    self._count_drop(kind)
                    continue
                for old in self._spool.append(topic, payload, retain, kind, durable):
                    if self.dropped + self.dropped_other == 0:
                        log.warning("MQTT spool full (%d messages or %.1f MB): dropping the oldest",
                                    self._spool.max_messages, self._spool.max_bytes / 1e6)
                    self._count_drop(old.kind)
            self._cond.notify_all()

    def _count_drop(self, kind: str) -> None:
        # Caller holds self._cond (or is the constructor).
        if kind == _EVENT:
            self.dropped += 1
        else:
            self.dropped_other += 1

    # ------------------------------------------------------------------ integrations

    def send(self, topic: str, payload: bytes | str, retain: bool = False, qos: int | None = None) -> bool:
        """Publish outside the spool, now, if connected (discovery, control state, levels).

        Returns False (and sends nothing) while disconnected: callers re-send what matters from
        a connect hook. Never raises on transport trouble.
        """
        if not self._connected:
            return False
        data = payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)
        return self._publish_direct(topic, data, retain, self._qos if qos is None else int(qos), _EXTRA)

    def subscribe(self, topic_filter: str, handler: MessageHandler) -> None:
        """Call `handler(topic, payload, retained)` (paho's thread) for messages on `topic_filter`; kept across reconnects."""
        with self._cond:
            self._subscriptions.append((topic_filter, handler))
            connected = self._connected
        if connected:
            self._client.subscribe(topic_filter, qos=1)

    def add_connect_hook(self, hook: Callable[[], None]) -> None:
        """Call `hook()` after every successful connection (paho's thread); at once if connected now."""
        with self._cond:
            self._connect_hooks.append(hook)
            connected = self._connected
        if connected:
            self._run_hook(hook)

    def _run_hook(self, hook: Callable[[], None]) -> None:
        try:
            hook()
        except Exception:  # noqa: BLE001 - one integration's bug must not cut the connection
            log.exception("MQTT connect hook %r failed", hook)

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        with self._cond:
            subs = list(self._subscriptions)
        for topic_filter, handler in subs:
            if mqtt.topic_matches_sub(topic_filter, msg.topic):
                try:
                    handler(msg.topic, bytes(msg.payload), bool(msg.retain))
                except Exception:  # noqa: BLE001 - a bad message must not kill paho's thread
                    log.exception("handling the MQTT message on %s failed", msg.topic)

    # ------------------------------------------------------------------ sender thread

    def _send_loop(self) -> None:
        """Hand spooled messages to paho, in order, while connected and the window has room."""
        while True:
            with self._cond:
                while True:
                    if self._stop_sender:
                        return
                    # A spool that fell back to memory retries its disk from here (bounded waits).
                    for old in self._spool.maintain():
                        self._count_drop(old.kind)
                    if self._ready and len(self._spool) and self._outstanding < _WINDOW:
                        break
                    self._cond.wait(self._spool.retry_in())
                entry = self._spool.pop()
                if self._qos > 0:
                    self._outstanding += 1
            try:
                info = self._client.publish(entry.topic, entry.payload, qos=self._qos, retain=entry.retain)
            except ValueError as e:  # invalid topic or payload: retrying cannot help
                log.error("MQTT cannot publish on %r: %s", entry.topic, e)
                with self._cond:
                    self._finish(_Sent(entry.topic, entry.kind, self._qos, entry), failed=True)
                continue
            with self._cond:
                if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:  # cannot happen with our window; be safe
                    self._outstanding -= self._qos > 0
                    self._spool.requeue(entry)
                    self._cond.wait(0.05)
                elif self._qos == 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                    # paho forgets QoS 0 messages it could not write: keep it for the next connection.
                    self._spool.requeue(entry)
                    self._ready = False
                else:
                    # QoS>0 and NO_CONN: paho keeps it and resends it after reconnecting.
                    self._record(info.mid, _Sent(entry.topic, entry.kind, self._qos, entry))

    # ------------------------------------------------------------------ acknowledgements

    def _record(self, mid: int, sent: _Sent) -> None:
        # Caller holds self._cond. The ack may already have come (paho's thread is fast).
        if mid in self._early_acks:
            self._finish(sent, self._early_acks.pop(mid))
        else:
            self._sent[mid] = sent

    def _finish(self, sent: _Sent, failed: bool) -> None:
        # Caller holds self._cond. Exactly once per message handed to paho.
        if sent.qos > 0:
            self._outstanding -= 1
        if sent.entry is not None:
            self._spool.done(sent.entry)
        if failed:
            self._count_drop(sent.kind)
        elif sent.kind == _EVENT:
            self.published += 1
        self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason_code: Any, properties: Any) -> None:
        failed = bool(getattr(reason_code, "is_failure", False))
        with self._cond:
            sent = self._sent.pop(mid, None)
            if sent is None:
                self._early_acks[mid] = failed
            else:
                self._finish(sent, failed)
            # The first acknowledgement after a reconnect proves paho's resend pass is over.
            if self._connected:
                self._ready = True
            self._cond.notify_all()
        if failed:
            log.warning("MQTT broker rejected a message on %s: %s", sent.topic if sent else "?",
                        _reason_text(reason_code))

    def _publish_direct(self, topic: str, payload: bytes, retain: bool, qos: int, kind: str) -> bool:
        """Publish outside the spool (status, integrations) from any thread."""
        with self._cond:
            if qos > 0:
                self._outstanding += 1
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as e:
            log.error("MQTT cannot publish on %r: %s", topic, e)
            with self._cond:
                self._outstanding -= qos > 0
            return False
        with self._cond:
            if qos == 0 and info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._early_acks.pop(info.mid, None)
                return False
            self._record(info.mid, _Sent(topic, kind, qos, None))
        return True

    # ------------------------------------------------------------------ paho network thread

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
            subscriptions = [f for f, _ in self._subscriptions]
            hooks = list(self._connect_hooks)
            self._cond.notify_all()
        self._log_state("connected", logging.INFO, "MQTT connected to %s:%s", self._config.host, self._config.port)
        self._publish_direct(self.status_topic, b"online", True, self._qos, _STATUS)
        if subscriptions:
            self._client.subscribe([(f, 1) for f in dict.fromkeys(subscriptions)])
        for hook in hooks:
            self._run_hook(hook)

    def _on_connect_fail(self, client: Any, userdata: Any) -> None:
        self._log_state(
            "unreachable",
            logging.WARNING,
            "MQTT broker %s:%s unreachable%s; retrying (at most every %ss), events are spooled meanwhile",
            self._config.host,
            self._config.port,
            " or TLS handshake failed (check ca_file, cert_file, host name)" if self._config.tls else "",
            self._config.reconnect_max_s,
        )

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        with self._cond:
            was_connected = self._connected
            self._connected = self._ready = self.connected = False
            closing = self._closing
        if was_connected and not closing:
            self._log_state("lost", logging.WARNING, "MQTT connection lost: %s; reconnecting", _reason_text(reason_code))
        elif not closing and not (self._last_state or "").startswith(("refused", "unreachable")):
            # Closed before the broker answered our CONNECT: with TLS 1.3 a missing or rejected
            # client certificate shows up only here, after the handshake looked fine.
            self._log_state(
                "closed", logging.ERROR, "MQTT broker %s:%s closed the connection before accepting it (%s)%s; retrying",
                self._config.host, self._config.port, _reason_text(reason_code),
                ": TLS client certificate missing or not accepted? (cert_file/key_file)" if self._config.tls else "",
            )

    def _log_state(self, state: str, level: int, msg: str, *args: Any) -> None:
        # Retries repeat the same failure every few seconds: log only when the state changes.
        if state != self._last_state:
            self._last_state = state
            log.log(level, msg, *args)

    # ------------------------------------------------------------------ owner side

    def stats(self) -> dict[str, Any]:
        """Counters and state: `connected`, `published`, `dropped`, `dropped_other`, `queued`, `queued_bytes`,
        `in_flight`, `spool_on_disk`, `spool_in_memory` (1 while a refused disk spool runs in memory),
        `spool_memory_seconds` (time spent so) and `spool_unsaved` (messages only memory holds)."""
        with self._cond:
            return {
                "connected": self.connected,
                "published": self.published,
                "dropped": self.dropped,
                "dropped_other": self.dropped_other,
                "queued": len(self._spool),
                "queued_bytes": self._spool.bytes,
                "in_flight": self._outstanding,
                "spool_on_disk": self._spool.on_disk,
                "spool_in_memory": self._spool.in_memory,
                "spool_memory_seconds": round(self._spool.memory_seconds, 3),
                "spool_unsaved": self._spool.unsaved,
            }

    def close(self, timeout_s: float = 2.0) -> None:
        """Publish `offline`, wait up to `timeout_s` for spooled and in-flight messages, disconnect.

        What is still undelivered stays in a disk spool for the next start.
        """
        deadline = time.monotonic() + timeout_s
        with self._cond:
            if self._closing:
                return
        self._enqueue((self.status_topic, b"offline", True, _STATUS, False))
        with self._cond:
            self._closing = True
            while (len(self._spool) or self._outstanding > 0) and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            left = len(self._spool) + self._outstanding
            for old in self._spool.maintain(force=True):  # a last try of a refused disk
                self._count_drop(old.kind)
            self._stop_sender = True
            self._cond.notify_all()
        if left:
            kept = "; kept in the spool for the next start" if self._spool.on_disk else ""
            log.warning("MQTT: %d message(s) not delivered before shutdown%s", left, kept)
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
            self._spool.close()
