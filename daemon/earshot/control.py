"""Run-time control over MQTT: enable/disable a source, change a label's threshold; persisted.

Topics (`<base>` = `<prefix>/<node>`):
- `<base>/<source>/enabled/set`: `ON` / `OFF` (also true/false, 1/0); `default` = back to on.
- `<base>/<source>/<label>/threshold/set`: a number in (0, 1); `default` = back to the
  configured (or the model's calibrated) value.
The current values are published retained on the same topics without `/set`, after each change
and on every (re)connect. Invalid commands are logged and answered with the current value.

Commands are applied only when they arrive live. A *retained* `/set` message (Home Assistant
and scripts sometimes publish with retain by mistake) is delivered again on every (re)connect
and would replay an old command over newer ones, e.g. switch a source off again after each
broker restart; so a message flagged retained is logged once and ignored. (A retained command
published while we are connected reaches us live, unflagged, and is applied once.) An empty
message is ignored too: it is what removing a retained message (`mosquitto_pub -r -n -t ...`)
sends to every subscriber.

Changes are applied in the detection worker (`Worker.call_soon`), never from paho's thread, and
saved as JSON (`<state_dir>/control.json`, written atomically) so they survive a restart; at start
they are applied before the first hop is scored.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .analyzer import Hop
from .detect import make_rules
from .events import Event
from .statedir import ensure_private_dir

log = logging.getLogger(__name__)

STATE_FILE = "control.json"
"""Name of the persisted run-time settings inside the state directory."""

_ON = {"on", "true", "1", "yes", "enable", "enabled"}
_OFF = {"off", "false", "0", "no", "disable", "disabled"}
_DEFAULT = {"default", "reset"}


def write_json_atomic(path: Path, data: Any) -> None:
    """Write `data` as JSON to `path` so a crash leaves the old or the new file, never a torn one."""
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class Control:
    """Applies and persists run-time settings; a service tap so it runs in the worker thread.

    `mqtt` may be None: then only the persisted settings are applied (no topics).
    """

    def __init__(self, service: Any, config: Any, mqtt: Any | None, state_dir: str | os.PathLike | None) -> None:
        """Load the persisted settings and subscribe to the `/set` topics."""
        self.service = service
        self.mqtt = mqtt
        self.hysteresis = float(config.detect.hysteresis)
        rules = make_rules(service.loaded.labels, service.loaded.thresholds, config.detect)
        self.labels = list(rules)
        self.sources = [s.name for s in config.active_sources]
        self._configured = {label: rule.threshold for label, rule in rules.items()}
        self.path = Path(state_dir) / STATE_FILE if state_dir else None
        self._lock = threading.Lock()
        # Overrides set at run time (and persisted); everything else follows the config.
        self._enabled: dict[str, bool] = {}
        self._thresholds: dict[str, dict[str, float]] = {}
        self._applied = False  # the worker has applied the persisted settings
        self._ignored: set[tuple[str, bytes]] = set()  # retained commands already logged
        self._load()
        self.base = mqtt.base if mqtt is not None else ""
        if mqtt is not None:
            mqtt.subscribe(f"{self.base}/+/enabled/set", self._on_enabled_set)
            mqtt.subscribe(f"{self.base}/+/+/threshold/set", self._on_threshold_set)
            mqtt.add_connect_hook(self.publish_all)

    # ------------------------------------------------------------------ state

    def enabled(self, source: str) -> bool:
        """Whether `source` is to run."""
        with self._lock:
            return self._enabled.get(source, True)

    def threshold(self, source: str, label: str) -> float:
        """The start threshold of `label` on `source`."""
        with self._lock:
            return self._thresholds.get(source, {}).get(label, self._configured[label])

    def _load(self) -> None:
        if self.path is None or not self.path.exists():
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            sources = data.get("sources", {})
            assert isinstance(sources, dict)
        except (OSError, ValueError, AssertionError, AttributeError) as e:
            log.error("ignoring unreadable run-time settings %s: %s", self.path, e)
            return
        for source, entry in sources.items():
            if source not in self.sources or not isinstance(entry, dict):
                log.warning("run-time settings: source %r is not configured; ignored", source)
                continue
            if isinstance(entry.get("enabled"), bool):
                self._enabled[source] = entry["enabled"]
            for label, t in (entry.get("thresholds") or {}).items():
                if label in self._configured and isinstance(t, (int, float)) and 0.0 < t < 1.0:
                    self._thresholds.setdefault(source, {})[label] = float(t)
                else:
                    log.warning("run-time settings: threshold %r=%r on %s ignored", label, t, source)
        if self._enabled or self._thresholds:
            log.info("run-time settings from %s: %s", self.path, self._describe())

    def _describe(self) -> str:
        parts = [f"{s} {'on' if v else 'off'}" for s, v in self._enabled.items()]
        parts += [f"{s}/{lab}>{t:.2f}" for s, d in self._thresholds.items() for lab, t in d.items()]
        return ", ".join(parts) or "none"

    def _save(self) -> None:
        # Caller holds self._lock.
        if self.path is None:
            return
        data = {"version": 1, "sources": {}}
        for source in self.sources:
            entry: dict[str, Any] = {}
            if source in self._enabled:
                entry["enabled"] = self._enabled[source]
            if self._thresholds.get(source):
                entry["thresholds"] = dict(self._thresholds[source])
            if entry:
                data["sources"][source] = entry
        try:
            write_json_atomic(self.path, data)
        except OSError as e:
            log.error("cannot save run-time settings to %s: %s (the change applies until restart)", self.path, e)

    # ------------------------------------------------------------------ MQTT (paho's thread)

    def _parse_topic(self, topic: str) -> list[str]:
        return topic[len(self.base) + 1:].split("/")

    def _replayed(self, topic: str, payload: bytes, retained: bool) -> bool:
        """True (and logged once per topic and payload) for a retained command: never applied.
        Also true, silently, for an empty message (a retained command being removed)."""
        if not payload.strip():
            return True
        if not retained:
            return False
        if (topic, payload) not in self._ignored:
            self._ignored.add((topic, payload))
            log.warning("control: ignoring the retained command %r on %s: commands apply only when sent "
                        "live (publish them without retain); remove it with: mosquitto_pub -r -n -t '%s'",
                        payload.decode("utf-8", "replace")[:40], topic, topic)
        return True

    def _on_enabled_set(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._replayed(topic, payload, retained):
            return
        error = self.set_enabled(self._parse_topic(topic)[0], payload.decode("utf-8", "replace"))
        if error:
            log.warning("control: %s: %s; ignored", topic, error)

    def _on_threshold_set(self, topic: str, payload: bytes, retained: bool) -> None:
        if self._replayed(topic, payload, retained):
            return
        source, label = (self._parse_topic(topic) + [""])[:2]
        error = self.set_threshold(source, label, payload.decode("utf-8", "replace"))
        if error:
            log.warning("control: %s: %s; ignored", topic, error)

    # ------------------------------------------------------------------ commands (MQTT and the web page)

    def set_enabled(self, source: str, text: str) -> str | None:
        """Apply an enable command (`ON`/`OFF`/`default`) as MQTT does; returns why it was refused, or None."""
        if source not in self.sources:
            return f"no source {source!r}"
        text, error = text.strip().lower(), None
        with self._lock:
            if text in _DEFAULT:
                self._enabled.pop(source, None)
            elif text in _ON or text in _OFF:
                self._enabled[source] = text in _ON
            else:
                error = f"expects ON or OFF, got {text[:40]!r}"
            if error is None:
                self._save()
        self._apply_later(lambda: self._apply_source(source))  # an invalid command is answered with the value
        return error

    def set_threshold(self, source: str, label: str, text: str) -> str | None:
        """Apply a threshold command (a number in (0, 1) or `default`) as MQTT does; returns why it was refused."""
        if source not in self.sources or label not in self._configured:
            return f"no source {source!r} or label {label!r}"
        text, error = text.strip().lower(), None
        with self._lock:
            if text in _DEFAULT:
                self._thresholds.get(source, {}).pop(label, None)
            else:
                try:
                    value = float(text)
                except ValueError:
                    value = float("nan")
                if 0.0 < value < 1.0:  # also refuses NaN and inf
                    self._thresholds.setdefault(source, {})[label] = value
                else:
                    error = f"expects a number in (0, 1), got {text[:40]!r}"
            if error is None:
                self._save()
        self._apply_later(lambda: self._apply_source(source))  # an invalid command is answered with the value
        return error

    def _apply_later(self, fn: Any) -> None:
        """Run `fn` in the worker; before the worker has started, the first tap call applies everything."""
        worker = getattr(self.service, "worker", None)
        with self._lock:
            applied = self._applied
        if worker is not None and applied and worker.is_alive():
            worker.call_soon(fn)
        else:
            self.publish_all()

    def publish_all(self) -> None:
        """Publish every current value, retained (on connect and before the worker runs)."""
        for source in self.sources:
            self._publish_source(source)

    def _publish_source(self, source: str) -> None:
        if self.mqtt is None:
            return
        self.mqtt.send(f"{self.base}/{source}/enabled", b"ON" if self.enabled(source) else b"OFF", retain=True)
        for label in self.labels:
            value = f"{round(self.threshold(source, label), 4):g}"
            self.mqtt.send(f"{self.base}/{source}/{label}/threshold", value.encode(), retain=True)

    # ------------------------------------------------------------------ worker thread

    def _apply_source(self, source: str) -> None:
        stream = self.service.stream(source)
        if stream is None:
            return
        enabled = self.enabled(source)
        if stream.enabled and not enabled:
            # End events in progress now: a disabled source must not leave a sensor stuck ON.
            self.service.worker.publish_all(stream, stream.analyzer.finish())
        if stream.enabled != enabled:
            log.info("source %s %s at run time", source, "enabled" if enabled else "disabled")
        stream.enabled = enabled
        detector = stream.analyzer.detector
        for label in self.labels:
            t = self.threshold(source, label)
            if abs(detector.thresholds.get(label, t) - t) > 1e-12:
                log.info("threshold of %s on %s set to %.3f at run time", label, source, t)
                detector.set_threshold(label, t, self.hysteresis)
        self._publish_source(source)

    def _apply_all(self) -> None:
        with self._lock:
            if self._applied:
                return
            self._applied = True
        for source in self.sources:
            self._apply_source(source)

    def on_reload(self, config: Any) -> None:
        """Worker thread, after a reload (SIGHUP) gave every detector the file's rules: the thresholds and
        switches set at run time stay in force on top of them (as they do across a restart), so the
        running detectors, the state file and the retained topics agree; new sources get theirs too."""
        rules = make_rules(self.service.loaded.labels, self.service.loaded.thresholds, config.detect)
        with self._lock:
            self.hysteresis = float(config.detect.hysteresis)
            self.labels = list(rules)
            self.sources = [s.name for s in config.active_sources]
            self._configured = {label: rule.threshold for label, rule in rules.items()}
        for source in self.sources:
            self._apply_source(source)

    wants_mel = False

    @property
    def wants_audio(self) -> bool:
        """Only until the persisted settings are applied (the worker calls taps only when they want)."""
        return not self._applied

    @property
    def wants_hops(self) -> bool:
        """As `wants_audio`: with worker processes no audio reaches this process, the first hop does."""
        return not self._applied

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Tap: the first audio applies the persisted settings (the worker exists only after start)."""
        if not self._applied:
            self._apply_all()

    def on_hop(self, source: str, hop: Hop) -> None:
        """Tap: the first hop applies the persisted settings, if no audio did."""
        if not self._applied:
            self._apply_all()

    def on_event(self, event: Event) -> Event:
        """Tap: events pass unchanged."""
        return event
