"""The daemon's one HTTP server implementation (page, live feed, clips, metrics), bounded in every way.

Why it exists: the earlier servers ran one thread per connection with no timeouts and a listen
backlog of 5; 115 idle connections made the daemon spin, lose clips and block MQTT reconnects,
and every client that hung up logged a traceback. Here:

- One selector thread accepts connections and reads each request (head up to 16 KiB, body up to
  64 KiB) without blocking. A request goes to the fixed pool of `workers` threads only once it has
  fully arrived, so an idle or slow client costs one file descriptor and no thread.
- At most `max_connections` connections are held (kept under half the process's open-file limit,
  so the daemon's own files, sockets and clips always have descriptors left). At the cap, the
  connection that has waited longest for its request (over 0.5 s) is closed to make room; when
  every held connection is busy, a new one is answered `503` at once and closed.
- A request must arrive within `timeout_s` of connecting, and a response must be written within
  `timeout_s` (a total, not per send), so a client that stops reading frees its worker.
- One request per connection (`Connection: close`): no keep-alive connection can hold a slot.
- Long-lived responses (the live feed) are handed to their owner (`Response.detach`) and leave
  the pool; the owner releases the slot when it drops the connection.
- A client that hangs up (reset, broken pipe, timeout) is counted and logged at debug level only.
- Pool threads run at a lower OS priority than the detection worker (Linux: per-thread nice +5).
- When accepting fails for lack of descriptors (EMFILE), accepting pauses for 0.1 s instead of
  spinning on a listening socket that stays readable.
"""

from __future__ import annotations

import errno
import http.client
import io
import logging
import os
import queue
import resource
import selectors
import socket
import threading
import time
import weakref
from collections.abc import Callable
from urllib.parse import parse_qs, unquote, urlsplit

from .httpmsg import Request, Response, _head, _quick, content, text

__all__ = ["BoundedServer", "Request", "Response", "content", "servers", "text"]

log = logging.getLogger(__name__)

BACKLOG = 128
"""Listen backlog (connections the kernel queues before we accept them)."""
MAX_HEAD_BYTES = 16 * 1024
"""Largest request line + headers (bytes); more gets 431."""
MAX_BODY_BYTES = 64 * 1024
"""Largest request body (bytes); more gets 413 (only small forms and JSON are posted)."""
EVICT_AFTER_S = 0.5
"""A connection waiting this long for its request may be closed to make room for a new one (s)."""
FD_RESERVE = 16
"""Descriptors always left to the rest of the daemon, beyond half the open-file limit."""


class _Conn:
    __slots__ = ("sock", "addr", "since", "buf", "head_end", "need")

    def __init__(self, sock: socket.socket, addr: tuple) -> None:
        self.sock, self.addr = sock, addr
        self.since = time.monotonic()
        self.buf = bytearray()
        self.head_end = -1
        self.need = 0  # total bytes (head + body) once the head is parsed


_SERVERS: weakref.WeakSet[BoundedServer] = weakref.WeakSet()


def servers() -> list[BoundedServer]:
    """The servers running in this process (for the metrics endpoint)."""
    return [s for s in list(_SERVERS) if not s._stop]


def fd_cap(wanted: int) -> int:
    """`wanted`, lowered to leave half the open-file limit (and FD_RESERVE more) to the rest of the daemon."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        return wanted
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(4, min(wanted, soft // 2 - FD_RESERVE))


class BoundedServer:
    """Serves `handler(Request) -> Response` on `host:port` within the limits in the module docstring."""

    def __init__(self, host: str, port: int, handler: Callable[[Request], Response], *, name: str = "http",
                 workers: int = 4, max_connections: int = 256, timeout_s: float = 10.0) -> None:
        """Bind and start serving (port 0 = any free one); raises OSError if the address cannot be bound."""
        self.handler, self.name = handler, name
        self.timeout_s = float(timeout_s)
        self.max_connections = fd_cap(int(max_connections))
        if self.max_connections < max_connections:
            log.info("%s: at most %d connections (the open-file limit allows no more)", name, self.max_connections)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.create_server((host, int(port)), family=family, backlog=BACKLOG)
        self.sock.setblocking(False)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.stats = {"accepted": 0, "requests": 0, "refused": 0, "evicted": 0, "timed_out": 0,
                      "disconnects": 0, "bad_requests": 0, "errors": 0}
        """Counters (read by metrics and tests)."""
        self._lock = threading.Lock()
        self._busy = 0  # connections in a worker or detached (guarded by _lock)
        self._waiting: dict[int, _Conn] = {}  # fd -> connection still arriving, oldest first (selector thread)
        self._queue: queue.SimpleQueue[tuple[_Conn, Request | None] | None] = queue.SimpleQueue()
        self._stop = False
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self._sel.register(self.sock, selectors.EVENT_READ)
        self._paused_until = 0.0
        self._threads = [threading.Thread(target=self._select_loop, name=f"earshot-{name}-io", daemon=True)]
        self._threads += [threading.Thread(target=self._work, name=f"earshot-{name}-{i}", daemon=True)
                          for i in range(max(1, int(workers)))]
        for t in self._threads:
            t.start()
        _SERVERS.add(self)

    @property
    def held(self) -> int:
        """Connections held now (waiting for their request, in a worker, or detached)."""
        with self._lock:
            return self._busy + len(self._waiting)

    # ------------------------------------------------------------------ selector thread

    def _select_loop(self) -> None:
        errors = 0
        while not self._stop:
            try:
                self._select_once()
            except Exception:  # noqa: BLE001 - a bug here must not end serving; logged once, then counted
                self.stats["errors"] += 1
                errors += 1
                if errors == 1:
                    log.exception("%s: the connection loop failed; going on", self.name)
                time.sleep(0.1)
        for conn in list(self._waiting.values()):
            self._drop(conn)

    def _select_once(self) -> None:
        """One round: accept, read what arrived, expire what waited too long."""
        now = time.monotonic()
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
            self._sel.register(self.sock, selectors.EVENT_READ)
        for key, _ in self._sel.select(timeout=self._sleep_s(now)):
            if key.fileobj is self.sock:
                self._accept()
            elif key.fileobj is self._wake_r:
                try:
                    self._wake_r.recv(4096)
                except OSError:
                    pass
            else:
                self._read(key.data)
        self._expire()

    def _accept(self) -> None:
        for _ in range(64):  # then let the other sockets have a turn
            try:
                sock, addr = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    if not self._evict():
                        log.warning("%s: out of file descriptors; not accepting for 0.1 s", self.name)
                        self._sel.unregister(self.sock)
                        self._paused_until = time.monotonic() + 0.1
                    return
                continue  # ECONNABORTED and the like: that client is gone
            self.stats["accepted"] += 1
            if self.held >= self.max_connections and not self._evict():
                self.stats["refused"] += 1
                try:
                    sock.setblocking(False)
                    sock.send(_quick(503, "1"))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            conn = _Conn(sock, addr)
            with self._lock:
                self._waiting[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _evict(self) -> bool:
        """Close the connection that has waited longest for its request, if it has waited long enough."""
        oldest = next(iter(self._waiting.values()), None)
        if oldest is None or time.monotonic() - oldest.since < EVICT_AFTER_S:
            return False
        self.stats["evicted"] += 1
        self._drop(oldest)
        return True

    def _drop(self, conn: _Conn, reply: bytes = b"") -> None:
        with self._lock:
            self._waiting.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        if reply:
            try:
                conn.sock.send(reply)
            except OSError:
                pass
        conn.sock.close()

    def _sleep_s(self, now: float) -> float | None:
        """How long the selector may wait: until the oldest waiting connection times out or a
        paused accept resumes; with neither, until something arrives (`close` wakes it). An idle
        server then costs no wake-ups (it used to look 4 times a second)."""
        due = [self._paused_until] if self._paused_until else []
        if self._waiting:
            due.append(next(iter(self._waiting.values())).since + self.timeout_s)  # oldest first
        return max(0.0, min(due) - now) if due else None

    def _expire(self) -> None:
        deadline = time.monotonic() - self.timeout_s
        for conn in list(self._waiting.values()):
            if conn.since > deadline:
                break  # the rest arrived later
            self.stats["timed_out"] += 1
            self._drop(conn, _quick(408) if conn.buf else b"")

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.stats["disconnects"] += 1
            self._drop(conn)
            return
        conn.buf += data
        if conn.head_end < 0:
            end = conn.buf.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(conn.buf) > MAX_HEAD_BYTES:
                    self.stats["bad_requests"] += 1
                    self._drop(conn, _quick(431))
                return
            conn.head_end = end + 4
            request = self._parse(conn)
            if request is None:
                return
            length = request.headers.get("Content-Length", "0").strip() or "0"
            if not length.isdigit() or int(length) > MAX_BODY_BYTES:
                self.stats["bad_requests"] += 1
                self._drop(conn, _quick(413))
                return
            conn.need = conn.head_end + int(length)
        if len(conn.buf) < conn.need:
            return
        request = self._parse(conn)
        if request is None:
            return
        with self._lock:
            self._waiting.pop(conn.sock.fileno(), None)
            self._busy += 1
        self._sel.unregister(conn.sock)
        self.stats["requests"] += 1
        self._queue.put((conn, request))

    def _parse(self, conn: _Conn) -> Request | None:
        """The request in `conn.buf` (head complete), or None after answering 400."""
        head = bytes(conn.buf[:conn.head_end])
        try:
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.decode("latin-1").split(" ")
            if not version.startswith("HTTP/1.") or not method.isalpha():
                raise ValueError(line)
            headers = http.client.parse_headers(io.BytesIO(rest))
            parts = urlsplit(target)
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise ValueError(target)
        except (ValueError, UnicodeDecodeError, http.client.HTTPException):
            self.stats["bad_requests"] += 1
            self._drop(conn, _quick(400))
            return None
        body = bytes(conn.buf[conn.head_end:conn.need]) if conn.need else b""
        return Request(method.upper(), path, parse_qs(parts.query), headers, body, conn.addr)

    # ------------------------------------------------------------------ worker threads

    def _work(self) -> None:
        try:  # Linux: a thread id is a process id for setpriority; detection comes first
            tid = threading.get_native_id()
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + 5)
        except (AttributeError, OSError):
            pass
        while True:
            item = self._queue.get()
            if item is None:
                return
            conn, request = item
            detached = False
            try:
                conn.sock.setblocking(True)
                conn.sock.settimeout(self.timeout_s)  # total time for each sendall
                detached = self._respond(conn.sock, request)
            except (ConnectionError, TimeoutError, OSError) as e:
                self.stats["disconnects"] += 1
                log.debug("%s: client %s went away: %s", self.name, conn.addr, e)
            except Exception:  # noqa: BLE001 - a handler bug: 500 for the client, traceback in the log
                self.stats["errors"] += 1
                log.exception("%s: %s %s failed", self.name, request.method, request.path)
                try:
                    conn.sock.sendall(_quick(500))
                except OSError:
                    pass
            finally:
                if not detached:
                    conn.sock.close()
                    self._release()

    def _respond(self, sock: socket.socket, request: Request) -> bool:
        response = self.handler(request)
        headers = [("Content-Type", response.content_type), *response.headers]
        if response.length:
            headers.append(("Content-Length", str(len(response.body))))
        if response.detach is None:
            headers.append(("Connection", "close"))
        data = _head(response.status, headers)
        if request.method != "HEAD":
            data += response.body
        sock.sendall(data)
        if response.detach is not None and request.method != "HEAD":
            released = threading.Event()

            def release() -> None:
                if not released.is_set():
                    released.set()
                    self._release()

            response.detach(sock, release)
            return True
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        return False

    def _release(self) -> None:
        with self._lock:
            self._busy -= 1

    # ------------------------------------------------------------------ shutdown

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop accepting, close waiting connections, let workers finish their request (bounded); idempotent."""
        if self._stop:
            return
        self._stop = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        for _ in self._threads[1:]:
            self._queue.put(None)
        deadline = time.monotonic() + timeout_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        try:
            self._sel.unregister(self.sock)
        except (KeyError, ValueError):
            pass
        self.sock.close()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

