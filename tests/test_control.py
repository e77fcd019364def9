"""Run-time control over MQTT against a real Mosquitto and a running Service: `/set` topics change
the detector and the source in the worker, the state is published retained and survives a restart."""

from __future__ import annotations

import json

import paho.mqtt.publish as mqtt_publish
import pytest

from brokers import retained, wait_until
from earshot.control import STATE_FILE
from inproc import demo_source, running_service

pytestmark = pytest.mark.timeout(90)

BASE = "earshot/testnode/yard"


def _raw(broker, state_dir) -> dict:
    return {"state_dir": str(state_dir), "source": demo_source(),
            "mqtt": {"host": broker.host, "port": broker.port, "reconnect_max_s": 1.0},
            "zmq": {"enabled": False}, "clips": {"enabled": False}, "homeassistant": {"enabled": False}}


def _set(broker, topic: str, payload: str) -> None:
    mqtt_publish.single(topic, payload, qos=1, hostname=broker.host, port=broker.port)


def test_set_topics_apply_publish_and_persist(tiny_model, mosquitto, tmp_path):
    """A threshold and an enabled flag set over MQTT reach the running detector and stream, are
    published retained, are saved to the state directory, and are applied again after a restart;
    invalid values are ignored and the current value is re-published."""
    state = tmp_path / "state"
    with running_service(tiny_model, _raw(mosquitto, state)) as (service, _, fanout):
        mqtt = fanout.publishers[0]
        assert wait_until(lambda: mqtt.connected, 10)
        stream = service.streams[0]
        detector = stream.analyzer.detector
        assert wait_until(lambda: retained(mosquitto, f"{BASE}/enabled") == b"ON", 10)
        original = detector.thresholds["glass_break"]
        assert retained(mosquitto, f"{BASE}/glass_break/threshold") == f"{round(original, 4):g}".encode()

        _set(mosquitto, f"{BASE}/glass_break/threshold/set", "0.83")
        assert wait_until(lambda: detector.thresholds["glass_break"] == pytest.approx(0.83), 10)
        assert wait_until(lambda: retained(mosquitto, f"{BASE}/glass_break/threshold") == b"0.83", 10)
        _set(mosquitto, f"{BASE}/glass_break/threshold/set", "2.5")  # out of range: ignored
        _set(mosquitto, f"{BASE}/nosuchlabel/threshold/set", "0.3")  # unknown label: ignored
        _set(mosquitto, f"{BASE}/enabled/set", "OFF")
        assert wait_until(lambda: not stream.enabled, 10)
        assert wait_until(lambda: retained(mosquitto, f"{BASE}/enabled") == b"OFF", 10)
        assert detector.thresholds["glass_break"] == pytest.approx(0.83)
        assert retained(mosquitto, f"{BASE}/glass_break/threshold") == b"0.83"
        heard = stream.analyzer.seconds_in
        wait_until(lambda: False, 0.5)
        assert stream.analyzer.seconds_in == heard  # a disabled source is not analysed

    saved = json.loads((state / STATE_FILE).read_text())
    assert saved["sources"]["yard"] == {"enabled": False, "thresholds": {"glass_break": 0.83}}

    with running_service(tiny_model, _raw(mosquitto, state)) as (service, _, fanout):
        stream = service.streams[0]
        assert wait_until(lambda: not stream.enabled, 10)
        assert stream.analyzer.detector.thresholds["glass_break"] == pytest.approx(0.83)
        _set(mosquitto, f"{BASE}/enabled/set", "ON")
        _set(mosquitto, f"{BASE}/glass_break/threshold/set", "default")
        assert wait_until(lambda: stream.enabled, 10)
        assert wait_until(lambda: stream.analyzer.detector.thresholds["glass_break"] == pytest.approx(original), 10)
        assert wait_until(lambda: retained(mosquitto, f"{BASE}/enabled") == b"ON", 10)
    saved = json.loads((state / STATE_FILE).read_text())
    assert saved["sources"]["yard"] == {"enabled": True}


def test_retained_commands_are_never_applied(tiny_model, mosquitto, tmp_path, caplog):
    """Retained `/set` messages found at (re)connect are logged and ignored: a retained OFF and a
    retained threshold left on the broker change nothing; a live command still works; removing the
    retained messages (an empty message reaches us live) resets nothing."""
    mqtt_publish.single(f"{BASE}/enabled/set", "OFF", qos=1, retain=True, hostname=mosquitto.host,
                        port=mosquitto.port)
    mqtt_publish.single(f"{BASE}/glass_break/threshold/set", "0.9", qos=1, retain=True, hostname=mosquitto.host,
                        port=mosquitto.port)
    with running_service(tiny_model, _raw(mosquitto, tmp_path / "state")) as (service, _, fanout):
        stream = service.streams[0]
        assert wait_until(lambda: "ignoring the retained command 'OFF'" in caplog.text, 10)
        assert wait_until(lambda: "ignoring the retained command '0.9'" in caplog.text, 10)
        assert stream.enabled and stream.analyzer.detector.thresholds["glass_break"] != pytest.approx(0.9)
        assert retained(mosquitto, f"{BASE}/enabled") == b"ON"
        _set(mosquitto, f"{BASE}/enabled/set", "OFF")  # live: applied
        assert wait_until(lambda: not stream.enabled, 10)
        for topic in (f"{BASE}/enabled/set", f"{BASE}/glass_break/threshold/set"):  # removing the retained ones
            mqtt_publish.single(topic, b"", qos=1, retain=True, hostname=mosquitto.host, port=mosquitto.port)
        _set(mosquitto, f"{BASE}/glass_break/threshold/set", "0.77")  # a live command after them, as a marker
        assert wait_until(lambda: stream.analyzer.detector.thresholds["glass_break"] == pytest.approx(0.77), 10)
        assert not stream.enabled  # the empty message did not reset it
    assert json.loads((tmp_path / "state" / STATE_FILE).read_text())["sources"]["yard"] == \
        {"enabled": False, "thresholds": {"glass_break": 0.77}}
