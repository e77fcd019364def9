"""A hostile ZeroMQ subscriber speaking ZMTP 3.0 over a plain TCP socket, and a victim process.

The hostile client keeps no state of its own (a libzmq SUB would build the same subscription trie
in the test process): it does the NULL handshake, then sends `n` subscription requests and never
reads. The victim (`python tests/hostile_zmq.py MODE`) binds either earshot's `ZmqPublisher`
(`earshot`) or a plain PUB socket (`pub`, what earshot used before), prints its endpoint, sends a
numbered event every 10 ms, and answers `rss` on stdin with its resident set (kB) and `stop` with
the number of events it sent. `python tests/hostile_zmq.py measure MODE N SIZE` runs one flood
and prints the victim's RSS (run from the repository root with `PYTHONPATH=daemon`).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import threading
import time


def _greeting() -> bytes:
    # signature, version 3.0 (so requests are messages starting with 0x01), NULL, as-server 0, filler
    return b"\xff" + b"\x00" * 8 + b"\x7f" + bytes([3, 0]) + b"NULL".ljust(20, b"\x00") + b"\x00" + b"\x00" * 31


def _ready(socket_type: bytes) -> bytes:
    body = b"\x05READY" + bytes([11]) + b"Socket-Type" + struct.pack(">I", len(socket_type)) + socket_type
    return b"\x04" + bytes([len(body)]) + body


def _frame(body: bytes) -> bytes:
    if len(body) < 256:
        return b"\x00" + bytes([len(body)]) + body
    return b"\x02" + struct.pack(">Q", len(body)) + body


def subscription_topics(n: int, size: int, seed: int = 0) -> list[bytes]:
    """`n` distinct random topics of `size` bytes; half start with `event.` (what earshot sends)."""
    rng = random.Random(seed)
    return [(b"event." if i % 2 == 0 else b"") + rng.randbytes(size)[: size - (6 if i % 2 == 0 else 0)]
            for i in range(n)]


class HostileSubscriber:
    """Connects to `host:port`, subscribes `n` times with `size`-byte topics, never reads."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.sendall(_greeting() + _ready(b"SUB"))

    def flood(self, n: int, size: int, chunk: int = 200) -> tuple[int, float]:
        """Send the requests until done or cut off; returns (requests sent, seconds it took)."""
        t0 = time.monotonic()
        topics = subscription_topics(n, size)
        sent = 0
        for i in range(0, n, chunk):
            try:
                self.sock.sendall(b"".join(_frame(b"\x01" + t) for t in topics[i:i + chunk]))
            except OSError:  # cut off by the victim
                break
            sent = min(n, i + chunk)
        return sent, time.monotonic() - t0

    def close(self) -> None:
        self.sock.close()


def rss_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _victim(mode: str) -> None:
    import zmq

    if mode == "earshot":
        from earshot.config import ZmqConfig
        from earshot.events import Event, iso_utc
        from earshot.publish.zmq import ZmqPublisher

        pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*"))
        endpoint = pub.endpoint
        ev = Event(type="start", id="0" * 32, label="gunshot", source="yard", node="n", onset=0.0, offset=None,
                   onset_time=iso_utc(1.7e9), offset_time=None, score=0.9)

        def send(i: int) -> None:
            pub.publish(ev, json.dumps({"n": i}).encode())
    else:
        ctx = zmq.Context()
        sock = ctx.socket(zmq.PUB)
        sock.bind("tcp://127.0.0.1:*")
        endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        lock = threading.Lock()

        def send(i: int) -> None:
            with lock:
                sock.send_multipart([b"event.yard.gunshot", json.dumps({"n": i}).encode()], flags=zmq.NOBLOCK)

    stop, sent = threading.Event(), [0]

    def loop() -> None:
        while not stop.wait(0.01):
            send(sent[0])
            sent[0] += 1

    threading.Thread(target=loop, daemon=True).start()
    print(endpoint, flush=True)
    for line in sys.stdin:
        if line.strip() == "rss":
            print(rss_kb(), flush=True)
        elif line.strip() == "stop":
            stop.set()
            time.sleep(0.05)
            print(sent[0], flush=True)
            return


def _measure(mode: str, n: int, size: int) -> None:
    """Victim RSS before a flood, after it (settled) and after the hostile client left (MB)."""
    import subprocess

    victim = subprocess.Popen([sys.executable, __file__, mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True)
    endpoint = victim.stdout.readline().strip()

    def rss() -> int:
        victim.stdin.write("rss\n")
        victim.stdin.flush()
        return int(victim.stdout.readline())

    time.sleep(0.5)
    before = rss()
    hostile = HostileSubscriber("127.0.0.1", int(endpoint.rsplit(":", 1)[1]))
    sent, took = hostile.flood(n, size)
    last, now = -1, rss()
    while abs(now - last) >= 512:
        time.sleep(0.5)
        last, now = now, rss()
    hostile.close()
    time.sleep(1.0)
    after = rss()
    victim.stdin.write("stop\n")
    victim.stdin.flush()
    victim.wait(10)
    print(f"{mode}: {sent} of {n} subscriptions of {size} B sent in {took:.1f} s; RSS {before / 1024:.0f} MB -> "
          f"{now / 1024:.0f} MB (+{(now - before) / 1024:.0f}), {after / 1024:.0f} MB after the client left")


if __name__ == "__main__":
    # python tests/hostile_zmq.py earshot|pub                  (the victim, driven by the tests)
    # python tests/hostile_zmq.py measure earshot|pub N SIZE   (one flood, RSS figures)
    if sys.argv[1] == "measure":
        _measure(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    else:
        _victim(sys.argv[1])
