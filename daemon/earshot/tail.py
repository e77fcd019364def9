"""`earshot tail`: watch the events a running earshot publishes, over MQTT or ZeroMQ.

One human-readable line per event (or the raw JSON with `raw_json=True`), e.g.
`2024-05-01T12:00:03.250Z  attic/mic0  START  glass_break  score=0.93  id=1a2b3c4d`.

An MQTT password never goes on the command line (every local user sees it in `ps`): the URL
names the user only (`mqtt://alice@host`), the password comes from `--password-file` or
`$EARSHOT_MQTT_PASSWORD`, as for the daemon. A URL that carries a password is refused, and every
message shows URLs with the password replaced by `***`.
"""

from __future__ import annotations

import logging
import sys
import threading
import uuid
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit

from earshot.events import START, Event

log = logging.getLogger(__name__)

_POLL_S = 0.1
"""How often the waiting loops look at the stop event (s)."""


PASSWORD_ENV = "EARSHOT_MQTT_PASSWORD"
"""Environment variable with the MQTT password (the same as the daemon's)."""


class TailError(Exception):
    """A user error in the tail arguments (one line, exit code 2)."""


def redact_url(url: str) -> str:
    """`url` with any password replaced by `***` (for messages); anything unparsable is returned as is
    unless it has an `@`, then everything before it is hidden."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = f"{parts.username or ''}:***@{parts.netloc.rpartition('@')[2]}"
        return parts._replace(netloc=netloc).geturl()
    except ValueError:
        return "***@" + url.rpartition("@")[2] if "@" in url else url


def _password(password_file: str | None) -> str | None:
    """The password from `password_file` (first line) or `$EARSHOT_MQTT_PASSWORD`, or None."""
    from earshot.publish.mqtt import password_from

    try:
        return password_from(password_file)
    except OSError as e:
        raise TailError(f"cannot read the password file {password_file}: {e.strerror}") from None


def format_event(event: Event) -> str:
    """One human-readable line for an event."""
    if event.type == START:
        when, what, extra = event.onset_time, "START", ""
    else:
        when, what = event.offset_time or event.onset_time, "END  "
        extra = f"  dur={event.offset - event.onset:.2f}s" if event.offset is not None else ""
    return f"{when}  {event.node}/{event.source}  {what}  {event.label}  score={event.score:.2f}{extra}  id={event.id[:8]}"


class _Printer:
    """Formats and writes lines from the transport thread, counting events up to `count`."""

    def __init__(self, out: TextIO, err: TextIO, raw_json: bool, node: str, count: int | None) -> None:
        self.out, self.err, self.raw_json, self.node, self.count = out, err, raw_json, node, count
        self.seen = 0
        self.done = threading.Event()
        self._lock = threading.Lock()

    def event(self, payload: bytes) -> None:
        """Print one event payload (a bad payload gets a warning line, not a crash)."""
        try:
            event = Event.from_json(payload)
        except (ValueError, TypeError) as e:
            self.note(f"ignoring a message that is not an earshot event: {e}")
            return
        if self.node not in ("+", event.node):
            return
        line = payload.decode("utf-8") if self.raw_json else format_event(event)
        with self._lock:
            if self.done.is_set():
                return
            self.out.write(line + "\n")
            self.out.flush()
            self.seen += 1
            if self.count is not None and self.seen >= self.count:
                self.done.set()

    def note(self, line: str) -> None:
        """One status line on the error stream (connection state, node availability)."""
        with self._lock:
            self.err.write(line + "\n")
            self.err.flush()

    def wait(self, stop: threading.Event | None) -> None:
        """Block until `count` events were printed, `stop` is set, or Ctrl-C."""
        try:
            while not self.done.wait(_POLL_S):
                if stop is not None and stop.is_set():
                    return
        except KeyboardInterrupt:
            return


def _tail_mqtt(url: str, node: str, topic_prefix: str, printer: _Printer, stop: threading.Event | None,
               username: str | None, password_file: str | None) -> None:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        host, has_password = parts.hostname, parts.password is not None
    except ValueError:
        raise TailError(f"not an MQTT URL: {shown!r} (expected mqtt://[user@]host[:port])") from None
    if parts.scheme not in ("mqtt", "mqtts") or not host:
        raise TailError(f"not an MQTT URL: {shown!r} (expected mqtt://[user@]host[:port])")
    if has_password:
        raise TailError(f"{shown}: do not put the password in the URL (every local user can read it with ps); "
                        f"use --password-file FILE (mode 0600) or ${PASSWORD_ENV}")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise TailError(f"bad port in MQTT URL {shown!r}") from None
    user = unquote(parts.username) if parts.username else username
    password = _password(password_file) if user else None
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=f"earshot-tail-{uuid.uuid4().hex[:8]}")
    if user:
        client.username_pw_set(user, password)
    if parts.scheme == "mqtts":
        client.tls_set()
    last = {"state": ""}  # log each connection state once, not on every retry

    def state(name: str, line: str) -> None:
        if last["state"] != name:
            last["state"] = name
            printer.note(line)

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            state(f"refused:{reason}", f"MQTT broker {host}:{port} refused the connection: {str(reason).lower()}")
            return
        state("connected", f"connected to {host}:{port}, waiting for events")
        c.subscribe([(f"{topic_prefix}/{node}/+/event", 1), (f"{topic_prefix}/{node}/status", 1)])

    def on_connect_fail(c: Any, userdata: Any) -> None:
        state("unreachable", f"MQTT broker {host}:{port} unreachable; retrying")

    def on_disconnect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if last["state"] == "connected":
            state("lost", f"MQTT connection to {host}:{port} lost ({str(reason).lower()}); retrying")

    def on_message(c: Any, userdata: Any, msg: Any) -> None:
        if msg.topic.endswith("/status"):
            printer.note(f"{msg.topic.split('/')[-2]} is {msg.payload.decode('utf-8', 'replace')}")
        else:
            printer.event(msg.payload)

    client.on_connect = on_connect
    client.on_connect_fail = on_connect_fail
    client.on_disconnect = on_disconnect
    client.on_message = on_message
    client.reconnect_delay_set(1, 10)
    client.connect_async(host, port, keepalive=30)
    client.loop_start()
    try:
        printer.wait(stop)
    finally:
        client.disconnect()
        client.loop_stop()


def _tail_zmq(endpoint: str, printer: _Printer, stop: threading.Event | None) -> None:
    import zmq

    context = zmq.Context()
    socket = context.socket(zmq.SUB)
    try:
        try:
            socket.connect(endpoint)
        except zmq.ZMQError as e:
            raise TailError(f"cannot connect to ZeroMQ {endpoint}: {e.strerror}") from None
        socket.setsockopt(zmq.SUBSCRIBE, b"event.")
        printer.note(f"listening on ZeroMQ {endpoint}, waiting for events")
        # The recv loop runs here (not in a thread): the socket stays in one thread.
        while not printer.done.is_set() and not (stop is not None and stop.is_set()):
            try:
                if not socket.poll(int(_POLL_S * 1000)):
                    continue
            except KeyboardInterrupt:
                return
            frames = socket.recv_multipart()
            if len(frames) != 2:
                printer.note(f"ignoring a ZeroMQ message with {len(frames)} frames")
                continue
            printer.event(frames[1])
    finally:
        socket.close(linger=0)
        context.term()


def tail(
    mqtt_url: str | None,
    zmq_endpoint: str | None,
    node: str = "+",
    stop: threading.Event | None = None,
    out: TextIO | None = None,
    count: int | None = None,
    raw_json: bool = False,
    topic_prefix: str = "earshot",
    err: TextIO | None = None,
    username: str | None = None,
    password_file: str | None = None,
) -> int:
    """Print events from MQTT (`mqtt://[user@]host:port`) or ZeroMQ (`tcp://host:port`) until stopped.

    The MQTT user is the URL's or `username`; its password comes from `password_file` or
    `$EARSHOT_MQTT_PASSWORD` (a URL with a password is refused).

    `node` filters by node name (`+` for all). Returns when `count` events were printed,
    `stop` is set or on Ctrl-C; the exit code is 0, or 2 with one line on `err` for bad
    arguments. An unreachable MQTT broker is reported once and retried. `out` and `err`
    default to `sys.stdout` and `sys.stderr` as they are at call time.
    """
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    printer = _Printer(out, err, raw_json, node, count)
    try:
        if (mqtt_url is None) == (zmq_endpoint is None):
            raise TailError("give exactly one of an MQTT URL (mqtt://host:port) or a ZeroMQ endpoint (tcp://host:port)")
        if count is not None and count < 1:
            raise TailError("count must be at least 1")
        if mqtt_url is not None:
            _tail_mqtt(mqtt_url, node, topic_prefix, printer, stop, username, password_file)
        else:
            assert zmq_endpoint is not None
            _tail_zmq(zmq_endpoint, printer, stop)
    except TailError as e:
        err.write(f"earshot tail: {e}\n")
        err.flush()
        return 2
    return 0
