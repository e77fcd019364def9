"""`earshot tail` against a real broker and a real ZeroMQ PUB socket."""

from __future__ import annotations

import io
import threading

import pytest

from brokers import free_port, wait_until
from earshot.config import MqttConfig, ZmqConfig
from earshot.events import Event, iso_utc, new_event_id
from earshot.publish.mqtt import MqttPublisher
from earshot.publish.zmq import ZmqPublisher
from earshot.tail import format_event, redact_url, tail

pytestmark = pytest.mark.timeout(30)


def make_event(i: int, type_: str = "start", node: str = "attic", id_: str | None = None) -> Event:
    end = type_ == "end"
    return Event(type=type_, id=id_ or f"{i:08x}" + new_event_id()[8:], label="glass_break", source="mic0", node=node,
                 onset=10.0 + i, offset=11.5 + i if end else None, onset_time=iso_utc(1_700_000_000 + i),
                 offset_time=iso_utc(1_700_000_001.5 + i) if end else None, score=0.931)


class TailThread:
    """Runs tail() in a thread with string streams and a stop event."""

    def __init__(self, **kw) -> None:
        self.out, self.err, self.stop = io.StringIO(), io.StringIO(), threading.Event()
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, kwargs=kw, daemon=True)
        self.thread.start()

    def _run(self, **kw) -> None:
        self.rc = tail(out=self.out, err=self.err, stop=self.stop, **kw)

    def finish(self, timeout_s: float = 10.0) -> int | None:
        self.thread.join(timeout_s)
        self.stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive(), "tail did not return"
        return self.rc


def test_format_event_lines():
    """The human line shows time, node/source, START/END, label, score, short id (and duration on END)."""
    start = make_event(1, id_="1a2b3c4d" + "0" * 24)
    end = make_event(1, "end", id_=start.id)
    assert format_event(start) == "2023-11-14T22:13:21.000Z  attic/mic0  START  glass_break  score=0.93  id=1a2b3c4d"
    assert format_event(end) == (
        "2023-11-14T22:13:22.500Z  attic/mic0  END    glass_break  score=0.93  dur=1.50s  id=1a2b3c4d"
    )


def test_tail_mqtt_prints_events_and_status(mosquitto):
    """Events from a real publisher through a real broker are printed, one line each, with
    the node filter applied; the node's availability goes to the status stream."""
    t = TailThread(mqtt_url=mosquitto.url, zmq_endpoint=None, node="attic", count=2)
    assert wait_until(lambda: "waiting for events" in t.err.getvalue(), 10)
    pub = MqttPublisher(MqttConfig(host=mosquitto.host, port=mosquitto.port), node="attic")
    other = MqttPublisher(MqttConfig(host=mosquitto.host, port=mosquitto.port), node="garage")
    try:
        other.publish(make_event(0, node="garage"))
        assert wait_until(lambda: other.published == 1, 10)
        events = [make_event(1), make_event(1, "end")]
        for e in events:
            pub.publish(e)
        assert t.finish() == 0
    finally:
        pub.close(1.0)
        other.close(1.0)
    assert t.out.getvalue().splitlines() == [format_event(e) for e in events]
    assert "attic is online" in t.err.getvalue()


def test_tail_mqtt_json_mode(mosquitto):
    """--json prints the raw event JSON exactly as published."""
    t = TailThread(mqtt_url=mosquitto.url, zmq_endpoint=None, count=1, raw_json=True)
    assert wait_until(lambda: "waiting for events" in t.err.getvalue(), 10)
    pub = MqttPublisher(MqttConfig(host=mosquitto.host, port=mosquitto.port), node="attic")
    try:
        e = make_event(2)
        pub.publish(e)
        assert t.finish() == 0
    finally:
        pub.close(1.0)
    assert t.out.getvalue() == e.to_json() + "\n"


def test_tail_mqtt_unreachable_reports_once_and_keeps_trying():
    """With no broker, tail says so in one line (not once per retry) and stops on request."""
    t = TailThread(mqtt_url=f"mqtt://127.0.0.1:{free_port()}", zmq_endpoint=None)
    assert wait_until(lambda: "unreachable" in t.err.getvalue(), 10)
    wait_until(lambda: False, 1.5)  # at least one retry (1 s backoff)
    t.stop.set()
    assert t.finish(5) == 0
    assert t.err.getvalue().count("unreachable") == 1


def test_tail_zmq_prints_events():
    """Events from a real ZeroMQ PUB socket are printed as human lines."""
    pub = ZmqPublisher(ZmqConfig(endpoint="tcp://127.0.0.1:*"))
    t = TailThread(mqtt_url=None, zmq_endpoint=pub.endpoint, count=3)
    try:
        e = make_event(3)
        # The SUB connects asynchronously: keep publishing until tail has printed enough.
        assert wait_until(lambda: (pub.publish(e), t.rc is not None)[1], 10, poll_s=0.05)
        assert t.finish() == 0
    finally:
        pub.close(0.1)
    assert t.out.getvalue().splitlines() == [format_event(e)] * 3


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"mqtt_url": None, "zmq_endpoint": None}, "give exactly one of"),
        ({"mqtt_url": "http://x", "zmq_endpoint": None}, "not an MQTT URL"),
        ({"mqtt_url": None, "zmq_endpoint": "nonsense"}, "cannot connect to ZeroMQ nonsense"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(kw, message):
    """Argument mistakes give exit code 2 and one line on stderr, no traceback."""
    err = io.StringIO()
    assert tail(out=io.StringIO(), err=err, **kw) == 2
    assert err.getvalue().count("\n") == 1 and message in err.getvalue()


def test_password_in_url_is_refused_and_never_printed():
    """A URL carrying a password is refused with one line that shows it as ***; redact_url hides it."""
    err = io.StringIO()
    assert tail(mqtt_url="mqtt://alice:hunter2@127.0.0.1:1", zmq_endpoint=None, out=io.StringIO(), err=err) == 2
    line = err.getvalue()
    assert line.count("\n") == 1 and "hunter2" not in line and "mqtt://alice:***@127.0.0.1:1" in line
    assert "--password-file" in line
    err = io.StringIO()
    assert tail(mqtt_url="http://bob:pw0rd@x", zmq_endpoint=None, out=io.StringIO(), err=err) == 2
    assert "pw0rd" not in err.getvalue() and "not an MQTT URL" in err.getvalue()
    assert redact_url("mqtts://u:p%40ss@h:8883/x") == "mqtts://u:***@h:8883/x"
    assert redact_url("mqtt://h:1883") == "mqtt://h:1883"


def test_tail_logs_in_with_password_file_or_environment(mosquitto_factory, tmp_path, monkeypatch):
    """The user from the URL, the password from --password-file or $EARSHOT_MQTT_PASSWORD: both get
    through a broker that refuses anonymous clients; a wrong one is reported without the password."""
    import subprocess

    pw = tmp_path / "passwd"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(pw), "earshot", "s3cret"], check=True, capture_output=True)
    broker = mosquitto_factory(f"allow_anonymous false\npassword_file {pw}\n").start()
    (tmp_path / "good").write_text("s3cret\n")
    url = f"mqtt://earshot@{broker.host}:{broker.port}"
    t = TailThread(mqtt_url=url, zmq_endpoint=None, password_file=str(tmp_path / "good"))
    assert wait_until(lambda: "waiting for events" in t.err.getvalue(), 10), t.err.getvalue()
    t.stop.set()
    assert t.finish(5) == 0
    monkeypatch.setenv("EARSHOT_MQTT_PASSWORD", "s3cret")
    t = TailThread(mqtt_url=url, zmq_endpoint=None)
    assert wait_until(lambda: "waiting for events" in t.err.getvalue(), 10), t.err.getvalue()
    t.stop.set()
    assert t.finish(5) == 0
    monkeypatch.setenv("EARSHOT_MQTT_PASSWORD", "wrong-secret")
    t = TailThread(mqtt_url=url, zmq_endpoint=None)
    assert wait_until(lambda: "refused" in t.err.getvalue(), 10), t.err.getvalue()
    t.stop.set()
    assert t.finish(5) == 0
    assert "wrong-secret" not in t.err.getvalue()
