"""Home Assistant MQTT discovery against a real Mosquitto and a running Service: retained, valid
configs whose state topics exist, availability on the daemon's status, re-sent on HA `online`."""

from __future__ import annotations

import json

import jinja2
import paho.mqtt.publish as mqtt_publish
import pytest

from brokers import Subscriber, retained, wait_until
from earshot.events import Event, iso_utc
from earshot.homeassistant import EVENT_TYPE, event_template
from inproc import demo_source, running_service

pytestmark = pytest.mark.timeout(90)


def _raw(broker, **ha) -> dict:
    return {"source": demo_source(), "mqtt": {"host": broker.host, "port": broker.port, "reconnect_max_s": 1.0},
            "zmq": {"enabled": False}, "clips": {"enabled": False},
            "homeassistant": {"discovery_prefix": "ha", "level_interval_s": 0.5, **ha}}


def _drained(fanout) -> bool:
    stats = fanout.stats()["mqtt"]
    return stats["connected"] and stats["queued"] == 0 and stats["in_flight"] == 0


def test_discovery_configs_are_retained_valid_and_point_at_live_topics(tiny_model, mosquitto):
    """Every discovery config is retained, valid JSON with a unique id, the node's device and the
    daemon's status as availability; every state topic it names carries a message (retained ON/OFF,
    control values, sound level), and an HA `online` announcement makes the daemon send them again."""
    labels = list(tiny_model.labels)
    expected = 2 + 3 * len(labels)  # per source: level sensor, switch; per label: binary_sensor, event, number
    with running_service(tiny_model, _raw(mosquitto)) as (service, integrations, fanout):
        ha = integrations.homeassistant
        assert wait_until(lambda: ha.sent >= 1, 10)
        # Handed to the publisher is not yet at the broker: wait until the broker has acknowledged them.
        assert wait_until(lambda: _drained(fanout), 30)
        sub = Subscriber(mosquitto, ["ha/#"])  # joins after they were sent: sees only retained ones
        assert sub.wait_for(lambda m: len(m) >= expected, 15)
        configs = {t: json.loads(p) for t, p, r in sub.messages if r}
        assert len(configs) == expected and all(r for _, _, r in sub.messages)
        assert len({c["unique_id"] for c in configs.values()}) == expected
        components = sorted(t.split("/")[1] for t in configs)
        assert components.count("binary_sensor") == components.count("event") == len(labels)
        assert components.count("sensor") == components.count("switch") == 1
        for topic, c in configs.items():
            assert topic == f"ha/{topic.split('/')[1]}/earshot_testnode/{c['unique_id'][len('earshot_testnode_'):]}/config"
            assert c["device"]["identifiers"] == ["earshot_testnode"] and c["device"]["name"] == "earshot testnode"
            assert c["availability_topic"] == "earshot/testnode/status"
            assert (c["payload_available"], c["payload_not_available"]) == ("online", "offline")
        assert retained(mosquitto, "earshot/testnode/status") == b"online"

        by_kind = {t.split("/")[1] + ":" + c["unique_id"]: c for t, c in configs.items()}
        for key, c in by_kind.items():
            if key.startswith("binary_sensor:"):
                assert c["device_class"] == "sound"
                assert retained(mosquitto, c["state_topic"]) in (b"ON", b"OFF")
            elif key.startswith(("switch:", "number:")):
                assert retained(mosquitto, c["state_topic"]) is not None
                assert c["command_topic"] == c["state_topic"] + "/set"
            elif key.startswith("event:"):
                assert c["state_topic"] == "earshot/testnode/yard/event" and c["event_types"] == [EVENT_TYPE]
            else:
                level = Subscriber(mosquitto, [c["state_topic"]])
                assert level.wait_for(lambda m: len(m) >= 1, 5), "no sound level message"
                value = json.loads(level.messages[0][1])
                assert set(value) == {"max", "mean", "hops"} and value["max"] >= value["mean"] > -121
                assert c["unit_of_measurement"] == "dBFS"
                level.close()

        before = len(sub.messages)
        mqtt_publish.single("ha/status", "online", hostname=mosquitto.host, port=mosquitto.port)
        assert sub.wait_for(lambda m: len(m) >= before + expected, 10)
        assert not any(r for _, _, r in sub.messages[before:])  # live re-send, not the retained replay
        sub.close()


def test_event_template_renders_ha_event_payload():
    """The event entity's value template (rendered with Jinja2 as Home Assistant does) turns a start
    of its label into `{"event_type": "detected", score, id, clip, ...}` and anything else into
    nothing (which Home Assistant ignores)."""
    env = jinja2.Environment()
    tpl = env.from_string(event_template("glass_break"))

    def render(event: Event) -> str:
        return tpl.render(value_json=json.loads(event.to_json())).strip()

    start = Event(type="start", id="ab" * 16, label="glass_break", source="yard", node="n", onset=1.0, offset=None,
                  onset_time=iso_utc(1.7e9), offset_time=None, score=0.91, clip="ab" * 16)
    out = json.loads(render(start))
    assert out == {"event_type": EVENT_TYPE, "score": 0.91, "id": "ab" * 16, "clip": "ab" * 16,
                   "onset_time": start.onset_time}
    no_clip = Event(**{**start.to_dict(), "clip": None})
    assert json.loads(render(no_clip))["clip"] is None
    other = Event(**{**start.to_dict(), "label": "gunshot"})
    end = Event(**{**start.to_dict(), "type": "end", "offset": 2.0, "offset_time": start.onset_time})
    assert render(other) == "" and render(end) == ""
