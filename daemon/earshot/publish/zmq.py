"""ZeroMQ publisher: a PUB socket sending multipart `[topic, event JSON]`.

The topic is `event.<source>.<label>` so a SUB socket can filter by prefix
(`event.` for everything, `event.kitchen.` for one source). The optional score feed
(`earshot.scores`) sends `scores.<source>` through the same socket (`send()`). PUB never
blocks: a slow or absent subscriber just misses messages, which is ZeroMQ's documented
semantics.

The socket is an XPUB (a PUB that also hears subscriptions), so the daemon knows whether
anyone subscribes to a topic (`has_subscriber`): the score feed is built only while someone
listens. To subscribers it is a PUB like any other.

What one subscriber can cost is bounded (`earshot.publish.zmqguard`): a TCP connection that
sends more than a subscriber needs (64 KB: a flood of subscriptions, which libzmq would keep
in memory) is cut off. Incoming messages over `MAX_MESSAGE_BYTES` disconnect their client.

With `curve_secret_file` set the socket is a CURVE server: traffic is encrypted and a
subscriber must know the server's public key (logged at start). Generate a key pair with
`python -c "import zmq; print(zmq.curve_keypair())"` (public, secret); put the secret in
the file. Any client that knows the public key may subscribe (no client allow-list).
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from earshot.events import Event
from earshot.publish import PublishError, payload_of, topic_part
from earshot.publish.zmqguard import SubscriberGuard

log = logging.getLogger(__name__)

SUBSCRIPTIONS_EVERY_S = 0.25
MAX_PREFIXES = 4096
"""Distinct subscriptions remembered; beyond it (a hostile client, many connections) every topic
counts as subscribed to, so the memory stays bounded and nobody misses data (PUB behaviour)."""
"""Least time between two reads of the subscriptions (s): a new subscriber gets data within this."""

TOPIC_PREFIX = "event."
"""Prefix of every topic frame; subscribe to it to get all events."""

MAX_MESSAGE_BYTES = 1024
"""Longest message a client may send (bytes): subscriptions, and CURVE handshake commands (about 300)."""


def read_curve_secret(path: str) -> bytes:
    """The Z85 secret key in `path`: a bare 40-character line, or a zmq.auth `secret-key = "..."` file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PublishError(f"cannot read zmq.curve_secret_file {path}: {e}") from None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("secret-key"):
            line = line.split("=", 1)[1].strip().strip('"')
        if len(line) == 40:
            try:
                zmq.curve_public(line.encode("ascii"))
            except (zmq.ZMQError, ValueError, UnicodeEncodeError):
                continue
            return line.encode("ascii")
    raise PublishError(f"zmq.curve_secret_file {path}: no 40-character Z85 secret key found; "
                       'create one with: python -c "import zmq; print(zmq.curve_keypair())"')


def zmq_topic(event: Event) -> bytes:
    """`event.<source>.<label>` as bytes (`.` in names is replaced so segments stay unambiguous)."""
    return f"{TOPIC_PREFIX}{topic_part(event.source, '.')}.{topic_part(event.label, '.')}".encode("utf-8")


class ZmqPublisher:
    """A PUB socket bound to `config.endpoint`, shared by the worker threads under a lock.

    ZeroMQ sockets are not thread-safe; sends are short and non-blocking, so a lock is
    simpler than a dedicated sender thread.
    """

    name = "zmq"

    def __init__(self, config: Any) -> None:
        """Bind the socket; raises `PublishError` with one clear line if that fails."""
        self._lock = threading.Lock()
        self.published = 0
        self.dropped = 0
        self._closed = False
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self._guard: SubscriberGuard | None = None
        self._prefixes: set[bytes] = set()  # topic prefixes subscribed to now (XPUB reports each once)
        self._prefixes_full = False  # more than MAX_PREFIXES were seen: assume a subscriber from then on
        self._polled = 0.0
        self.public_key: str | None = None
        """The CURVE server public key (Z85) when encryption is on."""
        secret_file = getattr(config, "curve_secret_file", None)
        if secret_file:
            try:
                secret = read_curve_secret(secret_file)
            except PublishError:
                self._socket.close(linger=0)
                self._context.term()
                raise
            self._socket.curve_secretkey = secret
            self._socket.curve_server = True
            self.public_key = zmq.curve_public(secret).decode("ascii")
        try:
            self._socket.bind(config.endpoint)
        except zmq.ZMQError as e:
            self._socket.close(linger=0)
            self._context.term()
            if e.errno == errno.EADDRINUSE:
                raise PublishError(
                    f"cannot bind ZeroMQ to {config.endpoint}: Address already in use; "
                    "set [zmq] endpoint to another port"
                ) from None
            raise PublishError(f"cannot bind ZeroMQ to {config.endpoint}: {e.strerror}; check [zmq] endpoint") from None
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        """The bound endpoint, with the actual port when the config asked for `*`."""
        if self.endpoint.startswith("tcp://"):
            self._guard = SubscriberGuard(self._socket)
        if self.public_key:
            log.info("publishing events on ZeroMQ %s, CURVE encrypted; server public key %s", self.endpoint,
                     self.public_key)
        else:
            log.info("publishing events on ZeroMQ %s", self.endpoint)

    def publish(self, event: Event, payload: bytes | None = None) -> None:
        """Send `[topic, json]`; never blocks or raises (a full queue or closed socket is counted)."""
        frames = [zmq_topic(event), payload_of(event, payload)]
        with self._lock:
            if self._closed:
                self.dropped += 1
                return
            try:
                self._socket.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:  # zmq.Again at the high-water mark, or a context being torn down
                if self.dropped == 0:
                    log.warning("ZeroMQ send failed (%s); further failures are only counted", e)
                self.dropped += 1
                return
            self.published += 1

    def send(self, topic: bytes, payload: bytes) -> bool:
        """Send another multipart `[topic, payload]` (the score feed) on the same socket; never blocks or raises.

        Not counted in `published`/`dropped` (those count events); returns whether it was queued.
        """
        with self._lock:
            if self._closed:
                return False
            try:
                self._socket.send_multipart([topic, payload], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                return False
            return True

    def has_subscriber(self, topic_prefix: bytes) -> bool:
        """Whether some subscriber would get a topic starting with `topic_prefix` (checked at most 4 times a second)."""
        now = time.monotonic()
        if now - self._polled >= SUBSCRIPTIONS_EVERY_S:
            self._polled = now
            with self._lock:
                if self._closed:
                    return False
                for _ in range(1000):  # bounded: a hostile client could subscribe without end
                    try:
                        msg = self._socket.recv(zmq.NOBLOCK)
                    except zmq.ZMQError:
                        break
                    if msg[:1] == b"\x01" and len(self._prefixes) < MAX_PREFIXES:
                        self._prefixes.add(msg[1:])
                    elif msg[:1] == b"\x01":
                        self._prefixes_full = True
                    elif msg[:1] == b"\x00":
                        self._prefixes.discard(msg[1:])
        if self._prefixes_full:
            return True
        return any(topic_prefix.startswith(p) or p.startswith(topic_prefix) for p in self._prefixes)

    def stats(self) -> dict[str, Any]:
        """Counters: `published`, `dropped`, `subscribers_cut` (connections cut off for sending too much)."""
        with self._lock:
            return {"published": self.published, "dropped": self.dropped,
                    "subscribers_cut": self._guard.cut if self._guard else 0}

    def close(self, timeout_s: float = 2.0) -> None:
        """Close the socket, letting queued messages go out for at most `timeout_s`, then end the context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._guard is not None:
                self._guard.close()  # under the lock: it turns the socket's monitor off
            self._socket.close(linger=max(0, int(timeout_s * 1000)))
        self._context.term()
