"""Wires the integrations into a Service: run-time control, Home Assistant, clips, the score feed.

`attach(service, config, publisher)` is called once by `earshot run` after the Service is built
and before it starts; it appends the taps (in this order: control, Home Assistant, clips, score
feed, web page) and registers the MQTT hooks. `Integrations.close()` after the service has stopped
writes the clips still waiting for post-roll and stops the web server (page, live feed, clips).
"""

from __future__ import annotations

import errno
import logging
from pathlib import Path
from typing import Any

from .config import web_listen
from .publish import PublishError
from .statedir import ensure_private_dir

log = logging.getLogger(__name__)

_FULL = (errno.ENOSPC, errno.EDQUOT)
"""Errors of a full disk: reported, never fatal (the state directory may fill while we run, or before)."""


def _publisher(fanout: Any, name: str) -> Any | None:
    return next((p for p in getattr(fanout, "publishers", []) if getattr(p, "name", "") == name), None)


class Integrations:
    """What `attach` created; `close()` once the service has stopped."""

    def __init__(self) -> None:
        self.control: Any = None
        self.homeassistant: Any = None
        self.clips: Any = None
        self.web: Any = None
        self.scores: Any = None

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush pending clips and stop the web server (bounded); never raises."""
        for part in (self.clips, self.web):
            if part is None:
                continue
            try:
                part.close(timeout_s)
            except Exception:  # noqa: BLE001 - shutdown must go on
                log.exception("closing %s failed", type(part).__name__)


def attach(service: Any, config: Any, publisher: Any) -> Integrations:
    """Add the integrations' taps and MQTT hooks to `service`; raises PublishError (one line) on setup failure."""
    from .control import Control
    from .detect import make_rules

    out = Integrations()
    mqtt = _publisher(publisher, "mqtt")
    zmq = _publisher(publisher, "zmq")
    state_dir = Path(config.state_dir) if config.state_dir else None
    if state_dir is not None:
        try:
            ensure_private_dir(state_dir)
        except OSError as e:
            if e.errno not in _FULL:
                raise PublishError(f"cannot create state_dir {state_dir}: {e.strerror}") from None
            # A full disk must not stop detection: the spool runs in memory and retries, clips fail one by one.
            log.error("cannot create state_dir %s: %s; going on without it until there is space", state_dir,
                      e.strerror)
    else:
        log.info("no state_dir: MQTT messages wait in memory only, run-time settings are not kept, no clips")

    out.control = Control(service, config, mqtt if config.mqtt.control else None, state_dir)
    service.taps.append(out.control)

    if mqtt is not None and config.homeassistant.enabled:
        from .homeassistant import HomeAssistant

        labels = list(make_rules(service.loaded.labels, service.loaded.thresholds, config.detect))
        out.homeassistant = HomeAssistant(mqtt, config, labels)
        service.taps.append(out.homeassistant)

    c = config.clips
    clip_dir = Path(c.dir) if c.dir else (state_dir / "clips" if state_dir else None)
    if c.enabled and clip_dir is not None:
        from .clips import ClipRecorder

        try:
            out.clips = ClipRecorder(clip_dir, service.loaded.frontend.sample_rate, c.pre_s, c.post_s,
                                     int(c.max_total_mb * 1_000_000), c.max_age_days * 86400.0)
        except OSError as e:
            if e.errno not in _FULL:
                raise PublishError(f"cannot use the clip directory {clip_dir}: {e.strerror}") from None
            log.error("cannot create the clip directory %s: %s (the disk is full); no clips this run", clip_dir,
                      e.strerror)
        if out.clips is not None:
            service.taps.append(out.clips)

    # Clips are served (on the web server) only when the recorder exists: not after a full disk at start.
    if config.web.enabled or (out.clips is not None and c.http):
        from .web import WebServer

        try:
            out.web = WebServer(service, config, out.control, clip_dir, out.clips is not None and c.http)
        except ValueError as e:  # the token file (check-config reports it first)
            if out.clips is not None:
                out.clips.close(1.0)
            raise PublishError(f"web.token_file: {e}") from None
        except OSError as e:
            # Like metrics: the page is secondary to detection, so a port in use is one error line.
            log.error("cannot serve the web page and clips on %s (%s); set [web] listen to a free port; "
                      "continuing without them", web_listen(config), e.strerror or e)

    if zmq is not None and config.zmq.scores:
        from .scores import ScoreFeed

        out.scores = ScoreFeed(zmq, service)
        service.taps.append(out.scores)
    return out
