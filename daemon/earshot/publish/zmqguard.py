"""Bounds what one ZeroMQ subscriber can cost: a connection that sends too much is cut off.

Why: libzmq's PUB (and XPUB, even with `ZMQ_XPUB_MANUAL`, which keeps its own copy "for
termination") stores every distinct subscription of every connection in a trie of about one
allocation per byte. One local client sending 200,000 subscriptions of 200 bytes grew the daemon
by 1-2 GB, never given back. No socket option bounds the number of subscriptions, and a
SUB-compatible socket without that state does not exist, so the guard watches the bytes each TCP
connection has *sent to us*: an honest subscriber sends a handshake and a few short
subscriptions (well under 1 KB; CURVE adds about 500 bytes), a subscriber has no other reason to
send anything. Past `budget_bytes` the connection is shut down; libzmq then drops its pipe and
frees its subscriptions, exactly as when a client disconnects. A well-behaved client that
reconnects is served again; one that floods again is cut again.

How, without touching libzmq's state from another thread: the socket monitor reports each
accepted connection's file descriptor; every `interval_s` the guard `dup()`s it, checks that it is
still that same connection (our port, the same peer), reads `tcpi_bytes_received` from
`TCP_INFO` (Linux >= 4.1) and, over budget, calls `shutdown()` on the duplicate (which acts on the
connection, not on libzmq's descriptor). IPC endpoints are not watched (local users only, and
file permissions apply).
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

log = logging.getLogger(__name__)

BUDGET_BYTES = 64 * 1024
"""Bytes a subscriber connection may send us before it is cut off (handshake + subscriptions)."""
INTERVAL_S = 0.02
"""How often the connections are looked at (s); a flood is cut within about this time."""
IDLE_WAIT_S = 0.5
"""How long the guard sleeps on the monitor while no TCP subscriber is connected (s): a new connection
wakes it at once, so only a stop waits this long. Polling every `INTERVAL_S` with nobody connected cost
0.4 % of a core, a quarter of the whole daemon's cost for one stream."""

_TCPI_BYTES_RECEIVED = 128
"""Offset of `tcpi_bytes_received` (u64) in Linux's `struct tcp_info`."""


def bytes_received(sock: socket.socket) -> int | None:
    """Bytes the kernel has received on this TCP connection, or None where TCP_INFO lacks the field."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except (OSError, AttributeError):
        return None
    if len(info) < _TCPI_BYTES_RECEIVED + 8:
        return None
    return struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)[0]


class SubscriberGuard:
    """A thread that cuts off subscriber connections of `zsocket` sending more than `budget_bytes`.

    Create it after `bind()`; `close()` before closing `zsocket`.
    """

    def __init__(self, zsocket: zmq.Socket, budget_bytes: int = BUDGET_BYTES, interval_s: float = INTERVAL_S) -> None:
        self.budget_bytes = int(budget_bytes)
        self.interval_s = float(interval_s)
        self.cut = 0
        """Connections cut off for sending too much."""
        self._conns: dict[int, tuple[Any, Any]] = {}  # fd -> (our address, peer address)
        self._stop = threading.Event()
        self._zsocket = zsocket
        self._monitor = zsocket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CLOSED)
        self._thread = threading.Thread(target=self._run, name="earshot-zmq-guard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._monitor, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if poller.poll(int((self.interval_s if self._conns else IDLE_WAIT_S) * 1000)):
                    while self._monitor.poll(0):
                        self._on_event(recv_monitor_message(self._monitor))
            except zmq.ZMQError:
                return
            for fd in list(self._conns):
                self._check(fd)

    def _on_event(self, msg: dict) -> None:
        fd = int(msg.get("value", -1))
        if msg.get("event") != zmq.EVENT_ACCEPTED:
            self._conns.pop(fd, None)
            return
        try:
            with _dup(fd) as dup:
                if dup.type != socket.SOCK_STREAM or dup.family not in (socket.AF_INET, socket.AF_INET6):
                    return
                self._conns[fd] = (dup.getsockname(), dup.getpeername())
        except OSError:
            pass  # already gone

    def _check(self, fd: int) -> None:
        names = self._conns.get(fd)
        try:
            with _dup(fd) as dup:
                # The descriptor may have been closed and its number reused: act only on the same connection.
                if (dup.getsockname(), dup.getpeername()) != names:
                    self._conns.pop(fd, None)
                    return
                sent = bytes_received(dup)
                if sent is None or sent <= self.budget_bytes:
                    return
                dup.shutdown(socket.SHUT_RDWR)
        except OSError:
            self._conns.pop(fd, None)
            return
        self._conns.pop(fd, None)
        self.cut += 1
        log.warning("ZeroMQ: cut off subscriber %s: it sent %d bytes, more than the %d a subscriber needs "
                    "(a flood of subscriptions would exhaust memory)", _peer(names[1]), sent, self.budget_bytes)

    def close(self) -> None:
        """Stop the thread and the monitor (bounded)."""
        self._stop.set()
        self._thread.join(1.0 + IDLE_WAIT_S + 2 * self.interval_s)
        try:
            self._zsocket.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(linger=0)


def _dup(fd: int) -> socket.socket:
    """Our own descriptor of libzmq's connection `fd` (family and type read from it); raises OSError."""
    copy = os.dup(fd)
    try:
        return socket.socket(fileno=copy)
    except OSError:
        os.close(copy)
        raise


def _peer(address: Any) -> str:
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
