"""Home Assistant MQTT discovery: one device per node, entities per source and label, no YAML.

Per source and label:
- `binary_sensor` (device class `sound`): ON while the event lasts; state = the retained
  `<base>/<source>/<label>` ON/OFF topic the MQTT publisher already keeps.
- `event` (event type `detected`): fires on each start, with score, id, clip and onset time as
  attributes; reads the existing `<base>/<source>/event` topic through a value template that keeps
  only this label's starts (an empty rendering is ignored by Home Assistant).
- `number` (with [mqtt] control): the start threshold, commands on `.../<label>/threshold/set`.
Per source: a `sensor` with the sound level (dBFS; max over the interval, mean as an attribute)
and (with control) a `switch` to enable or disable the source.

Every entity's availability is the daemon's status topic (`online`, and `offline` by last will).
Discovery configs are published retained on every connect and again when Home Assistant
announces itself (`<discovery_prefix>/status` = `online`, not retained).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from typing import Any

import numpy as np

from . import __version__
from .analyzer import Hop
from .events import Event

log = logging.getLogger(__name__)

EVENT_TYPE = "detected"
"""The one event type of the `event` entities."""


def _id(text: str) -> str:
    """`text` as a Home Assistant discovery id part ([a-zA-Z0-9_-])."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)


def event_template(label: str) -> str:
    """The value template turning an earshot event JSON into an HA event payload for `label` starts."""
    return (
        "{% if value_json.label == " + json.dumps(label) + " and value_json.type == 'start' %}"
        '{"event_type": "' + EVENT_TYPE + '", "score": {{ value_json.score }}, '
        '"id": {{ value_json.id | tojson }}, "clip": {{ value_json.get(\'clip\') | tojson }}, '
        '"onset_time": {{ value_json.onset_time | tojson }}}'
        "{% endif %}"
    )


def discovery_configs(*, node: str, base: str, status_topic: str, discovery_prefix: str, sources: list[str],
                      labels: list[str], control: bool, level_interval_s: float) -> list[tuple[str, dict]]:
    """Every (config topic, config payload) for this node. Pure, so tests can check it."""
    node_id = f"earshot_{_id(node)}"
    device = {"identifiers": [node_id], "name": f"earshot {node}", "manufacturer": "earshot",
              "model": "sound event detector", "sw_version": __version__}
    common = {"availability_topic": status_topic, "payload_available": "online",
              "payload_not_available": "offline", "device": device}
    out: list[tuple[str, dict]] = []

    def add(component: str, object_id: str, config: dict) -> None:
        uid = f"{node_id}_{object_id}"
        out.append((f"{discovery_prefix}/{component}/{node_id}/{object_id}/config",
                    {**config, "unique_id": uid, **common}))

    for source in sources:
        s = _id(source)
        out_level = f"{base}/{source}/level"
        add("sensor", f"{s}_level", {
            "name": f"{source} sound level", "state_topic": out_level, "value_template": "{{ value_json.max }}",
            "json_attributes_topic": out_level, "unit_of_measurement": "dBFS", "state_class": "measurement",
            "icon": "mdi:volume-high", "expire_after": int(max(30, 3 * level_interval_s)),
        })
        if control:
            add("switch", f"{s}_enabled", {
                "name": f"{source} listening", "state_topic": f"{base}/{source}/enabled",
                "command_topic": f"{base}/{source}/enabled/set", "payload_on": "ON", "payload_off": "OFF",
                "entity_category": "config", "icon": "mdi:ear-hearing",
            })
        for label in labels:
            o = f"{s}_{_id(label)}"
            add("binary_sensor", o, {
                "name": f"{source} {label}", "state_topic": f"{base}/{source}/{label}",
                "payload_on": "ON", "payload_off": "OFF", "device_class": "sound",
            })
            add("event", f"{o}_detection", {
                "name": f"{source} {label} detection", "state_topic": f"{base}/{source}/event",
                "event_types": [EVENT_TYPE], "value_template": event_template(label),
            })
            if control:
                add("number", f"{o}_threshold", {
                    "name": f"{source} {label} threshold", "state_topic": f"{base}/{source}/{label}/threshold",
                    "command_topic": f"{base}/{source}/{label}/threshold/set", "min": 0.01, "max": 0.99,
                    "step": 0.01, "mode": "box", "entity_category": "config",
                })
    return out


class _Level:
    """Sound level of one source over the current interval."""

    def __init__(self) -> None:
        self.count = 0
        self.power = 0.0
        self.max = -math.inf


class HomeAssistant:
    """Publishes the discovery configs and the rate-limited sound level; a service tap."""

    wants_audio = False
    wants_mel = False

    def __init__(self, mqtt: Any, config: Any, labels: list[str]) -> None:
        """Register with the MQTT publisher; spools every label `OFF` so the binary sensors start known."""
        h = config.homeassistant
        self.mqtt = mqtt
        self.interval_s = float(h.level_interval_s)
        self.sources = [s.name for s in config.active_sources]
        self.labels = list(labels)
        self.status_topic = f"{h.discovery_prefix}/status"
        self.configs = discovery_configs(
            node=config.node, base=mqtt.base, status_topic=mqtt.status_topic, discovery_prefix=h.discovery_prefix,
            sources=self.sources, labels=self.labels, control=bool(config.mqtt.control),
            level_interval_s=self.interval_s,
        )
        self._levels = {s: _Level() for s in self.sources}
        self._next = time.monotonic() + self.interval_s
        self.sent = 0
        """Discovery passes completed (for tests and logs)."""
        # Nothing is active at start; through the spool, so it cannot overtake an older ON.
        for source in self.sources:
            for label in self.labels:
                mqtt.publish_state(f"{mqtt.base}/{source}/{label}", b"OFF")
        mqtt.subscribe(self.status_topic, self._on_ha_status)
        mqtt.add_connect_hook(self.send_discovery)

    def send_discovery(self) -> None:
        """Publish every discovery config, retained."""
        ok = all([self.mqtt.send(topic, json.dumps(cfg), retain=True, qos=1) for topic, cfg in self.configs])
        if ok:
            self.sent += 1
            log.debug("Home Assistant discovery sent (%d entities)", len(self.configs))

    def _on_ha_status(self, topic: str, payload: bytes, retained: bool) -> None:
        # The retained `online` arrives on every subscribe, right after our connect hook sent discovery.
        if payload.strip() == b"online" and not retained:
            log.info("Home Assistant came online: sending discovery again")
            self.send_discovery()

    # ------------------------------------------------------------------ tap (worker thread)

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Tap: nothing to do per block."""

    def on_hop(self, source: str, hop: Hop) -> None:
        """Tap: accumulate the level; every `level_interval_s` publish max and mean per source (QoS 0)."""
        level = self._levels.get(source)
        if level is None:
            return
        level.count += 1
        level.power += 10.0 ** (hop.level_dbfs / 10.0)
        level.max = max(level.max, hop.level_dbfs)
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.interval_s
        for name, lv in self._levels.items():
            if lv.count:
                mean = 10.0 * math.log10(lv.power / lv.count) if lv.power > 0 else lv.max
                payload = json.dumps({"max": round(lv.max, 1), "mean": round(mean, 1), "hops": lv.count})
                self.mqtt.send(f"{self.mqtt.base}/{name}/level", payload, retain=False, qos=0)
            self._levels[name] = _Level()

    def on_event(self, event: Event) -> Event:
        """Tap: events pass unchanged."""
        return event
