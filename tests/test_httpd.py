"""The bounded HTTP server over real sockets: idle floods cost no thread and do not lock out real clients,
200 concurrent requests are all answered, slow or oversized requests are cut off, a client that hangs up
leaves no traceback, and every limit holds."""

from __future__ import annotations

import concurrent.futures
import http.client
import logging
import socket
import struct
import threading
import time

import pytest

from earshot.httpd import BoundedServer, Request, Response, content, text
from sockflood import idle_connections, raise_nofile

pytestmark = pytest.mark.timeout(60)


def _get(port: int, path: str = "/", timeout: float = 10.0, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.fixture
def server():
    made = []

    def make(handler=None, **kw) -> BoundedServer:
        def default(req: Request) -> Response:
            if req.path == "/slow":
                time.sleep(0.3)
            if req.path == "/big":
                return content(req, bytes(range(256)) * 4096, "application/octet-stream")
            return text(200, f"hello {req.method} {req.path} {len(req.body)}")

        s = BoundedServer("127.0.0.1", 0, handler or default, name="test", **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def test_idle_flood_costs_no_thread_and_real_clients_still_get_in(server):
    """1,000 idle connections: the server holds at most max_connections, starts no thread for them, keeps
    the process's CPU low, and a real request made during the flood is answered at once."""
    raise_nofile(4096)
    srv = server(workers=4, max_connections=64, timeout_s=5.0)
    threads_before = threading.active_count()
    idle = idle_connections(srv.port, 1000)
    time.sleep(1.0)  # idle ones are now old enough to be closed for a newcomer
    cpu0, t0 = time.process_time(), time.monotonic()
    time.sleep(1.0)
    cpu_idle = (time.process_time() - cpu0) / (time.monotonic() - t0)
    assert srv.held <= 64
    assert threading.active_count() == threads_before
    assert cpu_idle < 0.2, f"the server spins with idle connections: {cpu_idle:.0%} CPU"
    t = time.monotonic()
    assert _get(srv.port, "/during-flood")[0] == 200
    assert time.monotonic() - t < 1.0
    assert srv.stats["evicted"] + srv.stats["refused"] > 0
    for s in idle:
        s.close()


def test_200_concurrent_requests_all_answered(server):
    """200 clients at once against 4 workers: every one gets its 200 (none reset, none refused)."""
    raise_nofile(4096)
    srv = server(workers=4, max_connections=256)
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda i: _get(srv.port, f"/r{i}")[0], range(200)))
    assert results == [200] * 200
    assert srv.stats["requests"] == 200 and srv.stats["refused"] == 0


def test_busy_at_the_cap_refuses_quickly(server):
    """Every held connection busy: a newcomer gets 503 with Retry-After within a moment, not a queue."""
    release = threading.Event()

    def handler(req: Request) -> Response:
        release.wait(10)
        return text(200, "done")

    srv = server(handler, workers=8, max_connections=8)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        busy = [pool.submit(_get, srv.port, "/") for _ in range(8)]
        assert _wait(lambda: srv.held == 8 and srv.stats["requests"] == 8)
        time.sleep(EVICT_WAIT)
        t = time.monotonic()
        status, _ = _get(srv.port, "/extra", timeout=5)
        assert status == 503 and time.monotonic() - t < 1.0
        release.set()
        assert [f.result()[0] for f in busy] == [200] * 8


EVICT_WAIT = 0.6


def _wait(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def test_slow_request_is_cut_off(server):
    """A client that sends half a request head and stalls is answered 408 and closed after timeout_s."""
    srv = server(timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t = time.monotonic()
        data = s.recv(1000)
        assert data.startswith(b"HTTP/1.1 408") and 0.8 < time.monotonic() - t < 2.0
    assert srv.stats["timed_out"] == 1


@pytest.mark.parametrize("raw, status", [
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n", 431),
    (b"POST / HTTP/1.1\r\nContent-Length: 999999\r\n\r\n", 413),
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET / SPDY/9\r\n\r\n", 400),
])
def test_bad_requests_get_one_status(server, raw, status):
    """Oversized heads and bodies and malformed request lines get their status and are closed."""
    srv = server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(raw)
        assert s.recv(1000).startswith(f"HTTP/1.1 {status}".encode())


def test_post_body_and_range(server):
    """A small body reaches the handler whole; a Range request gets exactly its bytes (206)."""
    srv = server()
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    conn.request("POST", "/form", body=b"x" * 5000)
    assert conn.getresponse().read() == b"hello POST /form 5000\n"
    conn.close()
    status, body = _get(srv.port, "/big", headers={"Range": "bytes=100-199"})
    assert status == 206 and body == bytes(range(100, 200))
    assert _get(srv.port, "/big", headers={"Range": "bytes=9999999-"})[0] == 416


def test_client_hanging_up_leaves_no_traceback(server, caplog):
    """Clients that reset mid-response (a large body, a slow handler) are counted, with no traceback logged."""
    srv = server(workers=2)
    caplog.set_level(logging.DEBUG, logger="earshot.httpd")
    for path in ["/big", "/slow"] * 25:
        s = socket.create_connection(("127.0.0.1", srv.port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
        s.close()
    assert _wait(lambda: srv.held == 0, 10)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert srv.stats["errors"] == 0
    assert _get(srv.port, "/after")[0] == 200


def test_handler_bug_is_a_500_with_its_traceback(server, caplog):
    """A handler that raises is a bug: the client gets 500, the log gets the traceback, the server goes on."""
    def handler(req: Request) -> Response:
        raise RuntimeError("bug")

    srv = server(handler)
    assert _get(srv.port, "/")[0] == 500
    assert any(r.exc_info for r in caplog.records)
    assert srv.stats["errors"] == 1


def test_close_is_bounded_and_frees_the_port(server):
    """close() returns promptly with idle connections open, and the port can be bound again."""
    srv = server()
    idle = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(20)]
    t = time.monotonic()
    srv.close()
    assert time.monotonic() - t < 3.0
    with socket.create_server(("127.0.0.1", srv.port)):
        pass
    for s in idle:
        s.close()
