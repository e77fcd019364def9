"""The daemon's HTTP side under abuse while events flow (issue 15, item 6): 1,000 idle connections, 200
concurrent requests and clients that reset mid-response, against a running `earshot run` with a real
broker. Counts the events produced (stdout) against those delivered over MQTT: nothing may be lost, no
audio may be dropped, the daemon must not spin, and no traceback may reach the log. Run once with the
usual open-file limit and once with 128, the limit of the original report."""

from __future__ import annotations

import concurrent.futures
import http.client
import json
import socket
import struct
import time

import pytest

from audio_bursts import burst_wav
from brokers import Subscriber, wait_until
from sockflood import idle_connections, raise_nofile
from webdaemon import Daemon

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(__import__("os").sysconf("SC_CLK_TCK"))


def _cpu_share(pid: int, seconds: float) -> float:
    c0, t0 = _cpu_s(pid), time.monotonic()
    time.sleep(seconds)
    return (_cpu_s(pid) - c0) / (time.monotonic() - t0)


def _get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    except OSError as e:
        return -1 if not isinstance(e, TimeoutError) else -2
    finally:
        conn.close()


def _reset_mid_request(port: int, path: str) -> None:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends RST
    s.close()


@pytest.mark.parametrize("nofile, idle, all_ok", [(1024, 1000, True), (128, 300, False)])
def test_http_abuse_loses_nothing(tmp_path, tiny_checkpoint, mosquitto, nofile, idle, all_ok):
    """Idle flood, 200 concurrent requests and resets during a 24 s stream of detections: every event produced
    is delivered over MQTT, no audio is lost, the HTTP side does not spin, every request is answered (200;
    with 128 files some quick 503s are allowed), and the log has no traceback."""
    need = idle + 400
    limit = raise_nofile(need)
    if limit < need:
        pytest.skip(f"this test opens {need} sockets; the hard open-file limit is {limit}")
    wav = burst_wav(tmp_path / "bursts.wav", duration_s=24.0, every_s=1.2)
    sub = Subscriber(mosquitto, ["earshot/webnode/yard/event"])
    d = Daemon(tmp_path, tiny_checkpoint, wav, mosquitto.port, token=None, loop=False, nofile=nofile)
    try:
        d.wait_ready()
        baseline = _cpu_share(d.proc.pid, 2.0)

        flood = idle_connections(d.port, idle)
        time.sleep(1.0)
        during = _cpu_share(d.proc.pid, 3.0)

        paths = [(d.port, "/"), (d.port, "/api/events"), (d.port, "/clips/"), (d.port, "/api/state"),
                 (d.metrics_port, "/metrics")]
        with concurrent.futures.ThreadPoolExecutor(200) as pool:
            statuses = list(pool.map(lambda i: _get(*paths[i % len(paths)]), range(200)))
        clips = json.loads(_http_body(d.port, "/clips/") or b'{"clips": []}')["clips"]
        targets = [f"/clips/{c['id']}.flac" for c in clips[:5]] or ["/"]
        for i in range(100):
            _reset_mid_request(d.port if i % 2 else d.metrics_port, targets[i % len(targets)] if i % 2 else "/metrics")
        for s in flood:
            s.close()

        assert d.proc.wait(120) == 0, d.log.read_text()
        produced = [json.loads(line) for line in d.out.read_text().splitlines() if line.startswith("{")]
        wait_until(lambda: len(sub.messages) >= len(produced), 10)
    finally:
        d.stop()
        sub.close()
    log = d.log.read_text()
    delivered = [json.loads(p) for _t, p, _r in sub.messages]
    print(f"nofile {nofile}: produced {len(produced)}, delivered {len(delivered)}; CPU {baseline:.0%} before, "
          f"{during:.0%} with {idle} idle connections; statuses {sorted(set(statuses))} "
          f"({statuses.count(200)} x 200, {statuses.count(503)} x 503)")
    assert len(produced) >= 20, f"too few events to mean anything: {len(produced)}\n{log}"
    assert [(e["id"], e["type"]) for e in delivered] == [(e["id"], e["type"]) for e in produced]
    assert " 0 samples lost" in log, log
    assert "Traceback" not in log and "BrokenPipe" not in log, log
    assert during < baseline + 0.3, f"the daemon spins with {idle} idle connections: {during:.0%} vs {baseline:.0%}"
    if all_ok:
        assert statuses == [200] * 200, statuses
    else:
        assert set(statuses) <= {200, 503} and statuses.count(200) >= 20, statuses


def _http_body(port: int, path: str) -> bytes | None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.read() if r.status == 200 else None
    except OSError:
        return None
    finally:
        conn.close()
