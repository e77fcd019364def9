"""MQTT publisher against a real Mosquitto broker: topics, retained state, will, outages, overflow."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from brokers import Mosquitto, Subscriber, free_port, retained, wait_until
from earshot.config import MqttConfig
from earshot.events import Event, iso_utc, new_event_id
from earshot.publish import PublishError
from earshot.publish.mqtt import MqttPublisher

pytestmark = pytest.mark.timeout(60)

NODE = "testnode"


def make_event(i: int, type_: str = "start", label: str = "glass_break", source: str = "mic0", id_: str | None = None) -> Event:
    """A distinct event; `i` goes into onset so order is checkable."""
    onset = float(i)
    end = type_ == "end"
    return Event(
        type=type_,
        id=id_ or new_event_id(),
        label=label,
        source=source,
        node=NODE,
        onset=onset,
        offset=onset + 0.5 if end else None,
        onset_time=iso_utc(1_700_000_000 + onset),
        offset_time=iso_utc(1_700_000_000 + onset + 0.5) if end else None,
        score=0.5 + i / 1000,
    )


def config(broker: Mosquitto, **kw) -> MqttConfig:
    """Publisher config for `broker` with fast reconnects."""
    kw.setdefault("reconnect_max_s", 1.0)
    return MqttConfig(host=broker.host, port=broker.port, **kw)


def event_topic(source: str = "mic0") -> str:
    return f"earshot/{NODE}/{source}/event"



@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_events_state_and_status_reach_a_subscriber(mosquitto, closing, protocol):
    """Each event arrives as its exact JSON on <prefix>/<node>/<source>/event, the label state
    is retained ON then OFF, `online` is retained on status, and `offline` after close()."""
    sub = Subscriber(mosquitto, ["earshot/#"])
    pub = MqttPublisher(config(mosquitto, protocol=protocol), node=NODE)
    closing(pub)
    assert wait_until(lambda: pub.connected, 10)
    assert sub.wait_for(lambda m: b"online" in sub.on(f"earshot/{NODE}/status"))
    assert retained(mosquitto, f"earshot/{NODE}/status") == b"online"

    start = make_event(1)
    end = make_event(2, "end", id_=start.id)
    pub.publish(start)
    assert sub.wait_for(lambda m: len(sub.on(event_topic())) == 1)
    assert retained(mosquitto, f"earshot/{NODE}/mic0/glass_break") == b"ON"
    pub.publish(end, end.to_json().encode())  # the Fanout path: bytes serialized once by the caller
    assert sub.wait_for(lambda m: len(sub.on(event_topic())) == 2)
    assert sub.wait_for(lambda m: len(sub.on(f"earshot/{NODE}/mic0/glass_break")) == 2)

    got = [Event.from_json(p) for p in sub.on(event_topic())]
    assert got == [start, end]
    assert sub.on(event_topic())[0] == start.to_json().encode()
    assert sub.on(f"earshot/{NODE}/mic0/glass_break") == [b"ON", b"OFF"]
    assert retained(mosquitto, f"earshot/{NODE}/mic0/glass_break") == b"OFF"
    assert wait_until(lambda: pub.published == 2, 5)

    pub.close(2.0)
    assert sub.wait_for(lambda m: sub.on(f"earshot/{NODE}/status")[-1:] == [b"offline"])
    assert retained(mosquitto, f"earshot/{NODE}/status") == b"offline"
    assert pub.stats()["dropped"] == 0 and not pub.connected
    sub.close()


def test_last_will_offline_when_the_process_is_killed(mosquitto, tmp_path):
    """A publisher killed with SIGKILL (no close) still ends with retained `offline` (last will)."""
    script = tmp_path / "pub.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from earshot.config import MqttConfig
        from earshot.publish.mqtt import MqttPublisher
        pub = MqttPublisher(MqttConfig(host="127.0.0.1", port={mosquitto.port}, keepalive_s=5), node="{NODE}")
        deadline = time.monotonic() + 10
        while not pub.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        print("connected" if pub.connected else "not connected", flush=True)
        time.sleep(60)
    """))
    sub = Subscriber(mosquitto, [f"earshot/{NODE}/status"])
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "connected"
        assert sub.wait_for(lambda m: sub.on(f"earshot/{NODE}/status")[-1:] == [b"online"])
        os.kill(proc.pid, signal.SIGKILL)
        assert sub.wait_for(lambda m: sub.on(f"earshot/{NODE}/status")[-1:] == [b"offline"], timeout_s=15)
        assert retained(mosquitto, f"earshot/{NODE}/status") == b"offline"
    finally:
        proc.kill()
        proc.wait(5)
        sub.close()


def _first_seen(payloads: list[bytes]) -> list[Event]:
    """Events in order of first arrival (QoS 1 may deliver a message twice)."""
    out: list[Event] = []
    for p in payloads:
        e = Event.from_json(p)
        if e not in out:
            out.append(e)
    return out


def test_broker_down_at_start_events_delivered_in_order_later(mosquitto_factory, closing):
    """With the broker down at start, publish() neither raises nor blocks; once the broker
    comes up every queued event is delivered, in order."""
    broker = mosquitto_factory(persistence=True).start()
    # A persistent subscriber session makes delivery independent of who reconnects first.
    Subscriber(broker, [event_topic()], client_id="tester").close()
    broker.stop()

    pub = MqttPublisher(config(broker), node=NODE)
    closing(pub)
    events = [make_event(i) for i in range(5)]
    for e in events:
        pub.publish(e)
    assert not pub.connected and pub.stats()["queued"] == 10

    broker.start()
    assert wait_until(lambda: pub.connected, 10)
    sub = Subscriber(broker, [event_topic()], client_id="tester")
    assert sub.wait_for(lambda m: len(_first_seen(sub.on(event_topic()))) >= 5)
    assert _first_seen(sub.on(event_topic())) == events
    assert wait_until(lambda: pub.published == 5, 5) and pub.dropped == 0
    sub.close()


def test_broker_restart_midstream_delivers_events_from_the_outage(mosquitto_factory, closing):
    """Events published while the broker is restarting arrive after reconnect, in order,
    and the retained label state ends as the last one published."""
    broker = mosquitto_factory(persistence=True).start()
    sub = Subscriber(broker, [event_topic()], client_id="tester")
    pub = MqttPublisher(config(broker), node=NODE)
    closing(pub)
    assert wait_until(lambda: pub.connected, 10)
    events = [make_event(i, "start" if i % 2 == 0 else "end") for i in range(9)]
    for e in events[:3]:
        pub.publish(e)
    assert sub.wait_for(lambda m: len(sub.on(event_topic())) >= 3)

    broker.stop()
    assert wait_until(lambda: not pub.connected, 5)
    for e in events[3:]:
        pub.publish(e)
    broker.start()

    assert sub.wait_for(lambda m: len(_first_seen(sub.on(event_topic()))) >= 9, timeout_s=15)
    assert _first_seen(sub.on(event_topic())) == events
    assert wait_until(lambda: pub.stats()["queued"] == 0 and pub.stats()["in_flight"] == 0, 5)
    assert retained(broker, f"earshot/{NODE}/mic0/glass_break") == b"ON"  # events[8] is a start
    sub.close()


def test_queue_overflow_drops_oldest_and_counts(mosquitto_factory, closing):
    """With queue_limit messages held while disconnected, the oldest are dropped and counted,
    and the newest are the ones delivered after reconnect."""
    broker = mosquitto_factory(persistence=True).start()
    Subscriber(broker, [event_topic()], client_id="tester").close()
    broker.stop()

    pub = MqttPublisher(config(broker, queue_limit=4), node=NODE)  # 4 messages = 2 events (+ their states)
    closing(pub)
    events = [make_event(i) for i in range(5)]
    for e in events:
        pub.publish(e)
    stats = pub.stats()
    assert (stats["queued"], stats["dropped"], stats["dropped_other"]) == (4, 3, 3)

    broker.start()
    sub = Subscriber(broker, [event_topic()], client_id="tester")
    assert sub.wait_for(lambda m: len(_first_seen(sub.on(event_topic()))) >= 2)
    assert wait_until(lambda: pub.stats()["queued"] == 0 and pub.stats()["in_flight"] == 0, 5)
    assert _first_seen(sub.on(event_topic())) == events[3:]
    sub.close()


def test_refused_credentials_logged_once_with_hint(mosquitto_factory, tmp_path, caplog, closing):
    """A broker refusing our credentials is reported once (not on every retry) with a hint,
    and the password from password_file is the one that gets us in."""
    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "earshot", "s3cret"], check=True, capture_output=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {pw}\n")
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    wrong = tmp_path / "wrong"
    wrong.write_text("nope\n")
    good = tmp_path / "good"
    good.write_text("s3cret\n")

    with caplog.at_level(logging.INFO, logger="earshot.publish.mqtt"):
        bad = MqttPublisher(config(broker, username="earshot", password_file=str(wrong)), node=NODE)
        closing(bad)
        refused = lambda: [r for r in caplog.records if "refused" in r.getMessage()]  # noqa: E731
        assert wait_until(lambda: len(refused()) >= 1, 10)
        assert refused()[0].getMessage() == (
            "MQTT broker refused the connection: not authorized (check username/password)"
        )
        ok = MqttPublisher(config(broker, username="earshot", password_file=str(good)), node="other")
        closing(ok)
        assert wait_until(lambda: ok.connected, 10)
        # By now the bad client has retried at least once (1 s backoff) without logging again.
        wait_until(lambda: False, 1.5)
        assert len(refused()) == 1 and not bad.connected


def test_unreadable_password_file_is_a_clear_error(tmp_path):
    """A missing password_file fails at construction with one line naming the file."""
    with pytest.raises(PublishError, match=r"cannot read MQTT password_file .*missing"):
        MqttPublisher(MqttConfig(port=free_port(), username="u", password_file=str(tmp_path / "missing")), node=NODE)


def test_close_with_broker_down_is_bounded():
    """close() returns within about its timeout when the broker never came up."""
    pub = MqttPublisher(MqttConfig(host="127.0.0.1", port=free_port(), reconnect_max_s=1.0), node=NODE)
    pub.publish(make_event(0))
    t0 = time.monotonic()
    pub.close(0.5)
    assert time.monotonic() - t0 < 2.0
    assert pub.stats()["queued"] >= 2  # nothing could be delivered; still counted, not lost silently


def _tls_files(d: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1 (openssl CLI)."""
    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=d)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=test-ca")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "1", "-extfile", "ext.cnf")
    return d / "ca.crt", d / "server.crt", d / "server.key"


def test_tls_connection(mosquitto_factory, tmp_path, closing):
    """With tls=true and the broker's CA, events go over an encrypted listener."""
    ca, crt, key = _tls_files(tmp_path)
    plain = free_port()
    broker = mosquitto_factory(f"cafile {ca}\ncertfile {crt}\nkeyfile {key}\nlistener {plain} 127.0.0.1\n")
    broker.start()
    assert wait_until(lambda: _accepts(plain), timeout_s=10)  # start() waits for the TLS listener only
    sub = Subscriber(SimpleNamespace(host="127.0.0.1", port=plain), [event_topic()])  # the plain listener
    pub = MqttPublisher(config(broker, tls=True, ca_file=str(ca)), node=NODE)
    closing(pub)
    assert wait_until(lambda: pub.connected, 10)
    e = make_event(7)
    pub.publish(e)
    assert sub.wait_for(lambda m: len(sub.on(event_topic())) == 1)
    assert Event.from_json(sub.on(event_topic())[0]) == e
    sub.close()


def test_unacknowledged_messages_are_not_overtaken_after_reconnect(mosquitto_factory, closing):
    """Messages paho sent but never got acknowledged (frozen broker) are resent before the
    ones queued later: order, and so the final retained ON/OFF state, survives the outage."""
    broker = mosquitto_factory(persistence=True).start()
    sub = Subscriber(broker, [event_topic()], client_id="tester")
    pub = MqttPublisher(config(broker), node=NODE)
    closing(pub)
    assert wait_until(lambda: pub.connected, 10)

    broker.proc.send_signal(signal.SIGSTOP)  # accepts bytes into the socket buffer, acknowledges nothing
    try:
        events = [make_event(i, "start" if i % 2 == 0 else "end") for i in range(30)]
        for e in events:
            pub.publish(e)
        assert wait_until(lambda: pub.stats()["in_flight"] > 0 and pub.stats()["queued"] > 0, 5)
        broker.proc.terminate()  # handled when it continues: a clean shutdown that saves sessions
    finally:
        broker.proc.send_signal(signal.SIGCONT)
    broker.proc.wait(5)
    broker.proc = None
    broker.start()

    assert sub.wait_for(lambda m: len(_first_seen(sub.on(event_topic()))) >= 30, timeout_s=20)
    assert _first_seen(sub.on(event_topic())) == events
    assert wait_until(lambda: pub.stats()["queued"] == 0 and pub.stats()["in_flight"] == 0, 5)
    assert retained(broker, f"earshot/{NODE}/mic0/glass_break") == b"OFF"  # events[29] is an end
    sub.close()


def _accepts(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def test_password_sources_in_order(tmp_path, monkeypatch):
    """password_file first, then the systemd credential `mqtt-password` ($CREDENTIALS_DIRECTORY, as
    LoadCredential= provides it), then $EARSHOT_MQTT_PASSWORD."""
    from earshot.config import MqttConfig
    from earshot.publish.mqtt import read_password

    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "mqtt-password").write_text("from-credential\n")
    (tmp_path / "file").write_text("from-file\n")
    monkeypatch.setenv("EARSHOT_MQTT_PASSWORD", "from-env")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert read_password(MqttConfig(password_file=str(tmp_path / "file"))) == "from-file"
    assert read_password(MqttConfig()) == "from-credential"
    (creds / "mqtt-password").unlink()
    assert read_password(MqttConfig()) == "from-env"
