"""Prometheus metrics: what the daemon hears and how well it keeps up, served over HTTP on loopback.

`attach_metrics(service)` adds a `MetricsTap` to a not yet started `Service` and serves
`http://<[metrics] listen>/metrics`. Two kinds of numbers:

- measured in the worker thread through the tap (level, scores, hops, hop lag, inference time,
  events): set with prometheus-client's thread-safe metric objects, children created up front;
- read at scrape time from the objects that already count them (capture and ring counters,
  publisher stats, worker heartbeat, uptime): a custom collector, so nothing is counted twice.

Every series exists from the first scrape (counters at 0) so alerts such as
`increase(earshot_samples_lost_total[5m]) > 0` work before the first loss.
"""

from __future__ import annotations

import gzip
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from . import __version__
from .analyzer import SILENCE_DBFS, Hop
from .config import split_listen
from .detect import make_rules
from .events import EVENT_TYPES, Event
from .httpd import BoundedServer, Request, Response, text
from .httpd import servers as httpd_servers

if TYPE_CHECKING:
    from .service import Service

_LOGGER = logging.getLogger(__name__)

INFERENCE_BUCKETS_S = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
"""Histogram buckets of the per-hop compute time (s): a hop is 0.1 s, so anything near it is trouble."""

_HTTP_COUNTERS = ("accepted", "requests", "refused", "evicted", "timed_out", "disconnects", "bad_requests", "errors")
"""Counters of each HTTP server (httpd.BoundedServer.stats)."""
_PUBLISHER_COUNTERS = ("published", "dropped", "dropped_other", "spool_memory_seconds", "subscribers_cut")
"""Publisher stats that only grow; every other numeric stat (connected, queued, ...) is a gauge."""


class MetricsTap:
    """The service tap that feeds the metrics, plus the collector for counters read at scrape time.

    Called from the worker thread (`on_audio`, `on_hop`, `on_event`: quick, never raise) and from
    the HTTP server's threads (`collect`). The counters it reads there are plain ints written by
    one other thread, which the GIL makes safe to read.
    """

    def __init__(self, service: Service, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started = time.time()
        self._t0 = time.monotonic()
        r = self.registry
        config, loaded = service.config, service.loaded
        sources = [s.name for s in config.active_sources]
        labels = list(make_rules(loaded.labels, loaded.thresholds, config.detect)) or list(loaded.labels)

        info = Gauge("earshot_info", "Build and model of the running daemon (always 1).",
                     ["version", "node", "model"], registry=r)
        info.labels(__version__, config.node, str(loaded.provenance.get("name", "earshot"))).set(1)
        level = Gauge("earshot_level_dbfs", "RMS level of the latest hop (dBFS; -120 = silence or no audio yet).",
                      ["source"], registry=r)
        score = Gauge("earshot_score", "Latest class score (0..1).", ["source", "label"], registry=r)
        hops = Counter("earshot_hops_total", "Windows scored.", ["source"], registry=r)
        analyzed = Counter("earshot_samples_analyzed_total", "Samples handed to the detector.", ["source"], registry=r)
        lag = Gauge("earshot_hop_lag_seconds",
                    "Age of a hop's newest audio when it was scored (s): ring backlog + waiting + compute.",
                    ["source"], registry=r)
        infer = Histogram("earshot_inference_seconds",
                          "Compute per scored hop in the worker: log-mel frames + CNN (s).",
                          ["source"], buckets=INFERENCE_BUCKETS_S, registry=r)
        events = Counter("earshot_events_total", "Events published, by label and type (start/end).",
                         ["source", "label", "type"], registry=r)
        self._families = (level, hops, analyzed, lag, infer, score, events)
        self._labels = list(loaded.labels)
        self._reported = labels
        self._children: dict[str, tuple[Any, ...]] = {}
        for s in sources:
            self._source(s)
        self._events_family = events
        self._mark: dict[str, float] = {}  # source -> when its last hop (or audio block) was handled
        self._arrival: dict[str, tuple[float, float]] = {}  # source -> (monotonic arrival, backlog s)
        self.errors = 0
        """Exceptions swallowed in the tap (a bug if ever non-zero; logged once)."""
        r.register(self)

    # -- tap (worker thread) ------------------------------------------------------------------

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Note when a block arrived and how much audio still waited behind it in the ring."""
        try:
            now = time.monotonic()
            backlog_s = 0.0
            stream = self.service.stream(source)
            if stream is not None:
                backlog_s = stream.capture.ring.available() / float(stream.capture.samplerate or 1)
            self._arrival[source] = (now, backlog_s)
            self._mark[source] = time.perf_counter()
            self._source(source)[2].inc(samples.size)
        except Exception:  # noqa: BLE001 - a tap must never take the worker down
            self._failed()

    def on_hop(self, source: str, hop: Hop) -> None:
        """Level, scores, compute time and lag of one scored window."""
        try:
            now_pc = time.perf_counter()
            start = self._mark.get(source)
            self._mark[source] = now_pc
            level, hops, _analyzed, lag, infer, scores = self._source(source)
            hops.inc()
            level.set(hop.level_dbfs)
            for child, value in zip(scores, hop.scores):
                child.set(float(value))
            if start is not None:
                infer.observe(now_pc - start)
            arrival = self._arrival.get(source)
            stream = self.service.stream(source)
            if arrival is not None and stream is not None:
                # The analyzer's newest sample arrived at `arrival`; the hop's end is older by the audio after it.
                behind_s = max(0.0, stream.analyzer.seconds_in - hop.t_end)
                lag.set(time.monotonic() - arrival[0] + arrival[1] + behind_s)
        except Exception:  # noqa: BLE001 - a tap must never take the worker down
            self._failed()

    def on_event(self, event: Event) -> Event:
        """Count the event; returns it unchanged."""
        try:
            self._events_family.labels(event.source, event.label, event.type).inc()
        except Exception:  # noqa: BLE001 - a tap must never take the worker down
            self._failed()
        return event

    def _source(self, source: str) -> tuple[Any, ...]:
        """The per-source metric children (created, at zero, the first time: sources can be added by reload)."""
        children = self._children.get(source)
        if children is None:
            level, hops, analyzed, lag, infer, score, events = self._families
            children = (level.labels(source), hops.labels(source), analyzed.labels(source), lag.labels(source),
                        infer.labels(source), [score.labels(source, lab) for lab in self._labels])
            children[0].set(SILENCE_DBFS)
            for lab in self._reported:
                for kind in EVENT_TYPES:
                    events.labels(source, lab, kind)
            self._children[source] = children
        return children

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1:
            _LOGGER.exception("metrics tap failed; further failures are only counted")

    # -- collector (scrape threads) -------------------------------------------------------------

    def collect(self) -> Iterator[Any]:
        """Counters owned by other objects, read now: captures, publishers, worker, uptime."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        service = self.service
        up = GaugeMetricFamily("earshot_uptime_seconds", "Seconds since the daemon started.")
        up.add_metric([], time.monotonic() - self._t0)
        yield up
        start = GaugeMetricFamily("earshot_start_time_seconds", "Unix time the daemon started.")
        start.add_metric([], self.started)
        yield start

        fams = {
            "captured": CounterMetricFamily("earshot_samples_captured",
                                            "Samples written to the source's ring (at the model rate).",
                                            labels=["source"]),
            "lost": CounterMetricFamily("earshot_samples_lost",
                                        "Samples overwritten before the worker read them.", labels=["source"]),
            "overruns": CounterMetricFamily("earshot_overruns",
                                            "Times the worker fell a whole ring behind.", labels=["source"]),
            "flags": CounterMetricFamily("earshot_capture_status_flags",
                                         "Audio driver status flags (input overflow etc.).", labels=["source"]),
            "nonfinite": CounterMetricFamily("earshot_nonfinite_samples",
                                             "NaN/inf samples replaced by zero.", labels=["source"]),
        }
        backlog = GaugeMetricFamily("earshot_ring_backlog_seconds", "Audio waiting in the ring (s).",
                                    labels=["source"])
        source_up = GaugeMetricFamily("earshot_source_up", "1 while the source delivers audio, 0 otherwise.",
                                      labels=["source"])
        streams = {s.source.name: s for s in list(service.streams)}
        for name in [s.name for s in service.config.active_sources]:
            stream = streams.get(name)
            values = dict.fromkeys(fams, 0)
            queued, alive = 0.0, 0.0
            if stream is not None:
                c = stream.capture
                values.update(captured=c.ring.total_written, lost=c.lost_samples, overruns=c.overruns,
                              flags=c.status_flags, nonfinite=c.nonfinite_samples)
                queued = c.ring.available() / float(c.samplerate or 1)
                alive = float(not stream.done and c.error is None)
            for key, fam in fams.items():
                fam.add_metric([name], values[key])
            backlog.add_metric([name], queued)
            source_up.add_metric([name], alive)
        yield from fams.values()
        yield backlog
        yield source_up

        threshold = GaugeMetricFamily("earshot_threshold", "Score that starts an event (0..1), as applied now.",
                                      labels=["source", "label"])
        fallback = {k: r.threshold for k, r in
                    make_rules(service.loaded.labels, service.loaded.thresholds, service.config.detect).items()}
        for name in [s.name for s in service.config.active_sources]:
            stream = streams.get(name)
            detector = getattr(stream.analyzer, "detector", None) if stream is not None else None
            current = getattr(detector, "thresholds", None) or fallback
            for label, value in current.items():
                threshold.add_metric([name, label], float(value))
        yield threshold

        worker = service.worker
        age = GaugeMetricFamily("earshot_worker_heartbeat_age_seconds",
                                "Seconds since the worker last completed a loop (the watchdog stops past 10).")
        age.add_metric([], max(0.0, time.monotonic() - worker.heartbeat) if worker is not None else 0.0)
        yield age
        tap_errors = CounterMetricFamily("earshot_metrics_tap_errors", "Exceptions swallowed by the metrics tap.")
        tap_errors.add_metric([], self.errors)
        yield tap_errors
        yield from _publisher_families(service.publisher.stats())
        yield from _http_families()


def _http_families() -> Iterator[Any]:
    """`earshot_http_connections{server}` and a counter per stat of each bounded HTTP server (httpd.py)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    held = GaugeMetricFamily("earshot_http_connections", "Connections held by the HTTP server now.",
                             labels=["server"])
    counters = {key: CounterMetricFamily(f"earshot_http_{key}", f"HTTP server counter {key!r} (see docs/web.md).",
                                         labels=["server"]) for key in _HTTP_COUNTERS}
    for server in httpd_servers():
        held.add_metric([server.name], server.held)
        for key, fam in counters.items():
            fam.add_metric([server.name], server.stats.get(key, 0))
    yield held
    yield from counters.values()


def _publisher_families(stats: dict[str, dict[str, Any]]) -> Iterator[Any]:
    """`earshot_publisher_<stat>{publisher}` per numeric stat of `Fanout.stats()`."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    fams: dict[str, Any] = {}
    for publisher, values in stats.items():
        for key, value in values.items():
            if isinstance(value, bool):
                value = int(value)
            if not isinstance(value, (int, float)):
                continue
            if key not in fams:
                name = f"earshot_publisher_{key}"
                if key in _PUBLISHER_COUNTERS:
                    fams[key] = CounterMetricFamily(name, f"Publisher counter {key!r}.", labels=["publisher"])
                else:
                    fams[key] = GaugeMetricFamily(name, f"Publisher state {key!r} (connected: 1/0; queue depths).",
                                                  labels=["publisher"])
            fams[key].add_metric([publisher], value)
    yield from fams.values()


# -- HTTP ---------------------------------------------------------------------------------------


class MetricsServer:
    """Serves a registry at `/metrics` on the bounded HTTP server (httpd.py: pool, timeouts, connection cap)."""

    def __init__(self, host: str, port: int, registry: Any) -> None:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        def handle(request: Request) -> Response:
            if request.method not in ("GET", "HEAD"):
                return text(405, "method not allowed")
            if request.path not in ("/metrics", "/"):
                return text(404, "not found; metrics are at /metrics")
            body = generate_latest(registry)
            headers = []
            if "gzip" in request.headers.get("Accept-Encoding", ""):
                body, headers = gzip.compress(body, 5), [("Content-Encoding", "gzip")]
            return Response(200, body, CONTENT_TYPE_LATEST, headers)

        self.httpd = BoundedServer(host, port, handle, name="metrics", workers=2, max_connections=64)
        self.host, self.port = host, self.httpd.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving (bounded) and release the port."""
        self.httpd.close()


def attach_metrics(service: Service) -> MetricsServer | None:
    """Add the metrics tap to `service` (before `start()`) and serve it; None when disabled or unavailable.

    Metrics are secondary to detection: a missing prometheus-client or a port in use is one
    error line in the log, and the daemon keeps detecting.
    """
    cfg = service.config.metrics
    if not cfg.enabled:
        return None
    try:
        import prometheus_client  # noqa: F401 - only checking that it is installed
    except ImportError:
        _LOGGER.error("metrics: prometheus-client is not installed (pip install prometheus-client, "
                      "or set [metrics] enabled = false); continuing without metrics")
        return None
    address = split_listen(cfg.listen)
    assert address is not None, "config validation checks metrics.listen"
    tap = MetricsTap(service)
    try:
        server = MetricsServer(address[0], address[1], tap.registry)
    except OSError as e:
        _LOGGER.error("metrics: cannot listen on %s (%s); set [metrics] listen to a free port; "
                      "continuing without metrics", cfg.listen, e.strerror or e)
        return None
    service.taps.append(tap)
    _LOGGER.info("metrics on %s", server.url)
    return server
