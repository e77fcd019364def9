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

import bisect
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
    """The service tap that feeds the metrics, plus the collector that renders them at scrape time.

    Per hop the tap only keeps a reference to the hop and counts its compute time in a bucket
    (a few hundred nanoseconds); levels, scores, counters and lag are turned into series when
    Prometheus scrapes, every 15 s or so, not ten times a second per source. Hop counts, lag
    and samples analyzed are read from the streams (`service.Stream`), which count them anyway.

    Called from the worker thread (`on_hop`, `on_event`: quick, never raise) and from the HTTP
    server's threads (`collect`). What `collect` reads are plain attributes written by one other
    thread, which the GIL makes safe to read.
    """

    wants_audio = False
    wants_mel = False

    def __init__(self, service: Service, registry: Any = None) -> None:
        from prometheus_client import CollectorRegistry, Gauge

        self.service = service
        self.registry = registry if registry is not None else CollectorRegistry()
        self.started = time.time()
        self._t0 = time.monotonic()
        config, loaded = service.config, service.loaded
        self._labels = list(loaded.labels)
        self._reported = list(make_rules(loaded.labels, loaded.thresholds, config.detect)) or list(loaded.labels)
        info = Gauge("earshot_info", "Build and model of the running daemon (always 1).",
                     ["version", "node", "model"], registry=self.registry)
        info.labels(__version__, config.node, str(loaded.provenance.get("name", "earshot"))).set(1)
        self._last: dict[str, Hop] = {}  # source -> its latest hop
        self._infer: dict[str, list[float]] = {}  # source -> [count per bucket..., +Inf count, sum]
        self._events: dict[tuple[str, str, str], int] = {}  # (source, label, type) -> count
        self.errors = 0
        """Exceptions swallowed in the tap (a bug if ever non-zero; logged once)."""
        self.registry.register(self)

    # -- tap (worker thread) ------------------------------------------------------------------

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Not called (wants_audio is False): the streams count their samples themselves."""

    def on_hop(self, source: str, hop: Hop) -> None:
        """Keep the hop (level and scores at scrape time) and count its compute time."""
        try:
            self._last[source] = hop
            counts = self._infer.get(source)
            if counts is None:
                counts = self._infer[source] = [0.0] * (len(INFERENCE_BUCKETS_S) + 2)
            stream = self.service.stream(source)
            compute_s = getattr(stream, "compute_s", None)
            if compute_s is not None:
                counts[bisect.bisect_left(INFERENCE_BUCKETS_S, compute_s)] += 1
                counts[-1] += compute_s
        except Exception:  # noqa: BLE001 - a tap must never take the worker down
            self._failed()

    def on_event(self, event: Event) -> Event:
        """Count the event; returns it unchanged."""
        try:
            key = (event.source, event.label, event.type)
            self._events[key] = self._events.get(key, 0) + 1
        except Exception:  # noqa: BLE001 - a tap must never take the worker down
            self._failed()
        return event

    def _failed(self) -> None:
        self.errors += 1
        if self.errors == 1:
            _LOGGER.exception("metrics tap failed; further failures are only counted")

    def _hop_families(self, names: list[str], streams: dict[str, Any]) -> Iterator[Any]:
        """Level, scores, hops, samples analyzed, lag, compute time and events, per source."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        level = GaugeMetricFamily("earshot_level_dbfs", "RMS level of the latest hop (dBFS; -120 = silence or no "
                                  "audio yet).", labels=["source"])
        score = GaugeMetricFamily("earshot_score", "Latest class score (0..1).", labels=["source", "label"])
        hops = CounterMetricFamily("earshot_hops", "Windows scored.", labels=["source"])
        analyzed = CounterMetricFamily("earshot_samples_analyzed", "Samples handed to the detector.",
                                       labels=["source"])
        lag = GaugeMetricFamily("earshot_hop_lag_seconds", "Age of a hop's newest audio when it was scored (s): "
                                "ring backlog + waiting + compute.", labels=["source"])
        infer = HistogramMetricFamily("earshot_inference_seconds", "Compute per scored hop in the worker: reading, "
                                      "log-mel frames + CNN, for the batch it was scored in (s).", labels=["source"])
        events = CounterMetricFamily("earshot_events", "Events published, by label and type (start/end).",
                                     labels=["source", "label", "type"])
        sr = float(self.service.loaded.frontend.sample_rate)
        for name in names:
            stream = streams.get(name)
            hop = self._last.get(name)
            level.add_metric([name], float(hop.level_dbfs) if hop is not None else SILENCE_DBFS)
            values = np.asarray(hop.scores).reshape(-1) if hop is not None else ()
            for i, label in enumerate(self._labels):
                score.add_metric([name, label], float(values[i]) if i < len(values) else 0.0)
            hops.add_metric([name], getattr(stream, "hops", 0))
            analyzed.add_metric([name], round(stream.analyzer.seconds_in * sr) if stream is not None else 0)
            lag.add_metric([name], getattr(stream, "lag_s", 0.0))
            counts = self._infer.get(name) or [0.0] * (len(INFERENCE_BUCKETS_S) + 2)
            cumulative, buckets = 0.0, []
            for bound, n in zip([*map(str, INFERENCE_BUCKETS_S), "+Inf"], counts[:-1]):
                cumulative += n
                buckets.append((bound, cumulative))
            infer.add_metric([name], buckets, counts[-1])
            for label in self._reported:
                for kind in EVENT_TYPES:
                    events.add_metric([name, label, kind], self._events.get((name, label, kind), 0))
        for (name, label, kind), n in list(self._events.items()):
            if name not in names or label not in self._reported:
                events.add_metric([name, label, kind], n)
        yield from (level, score, hops, analyzed, lag, infer, events)

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
        names = [s.name for s in service.config.active_sources]
        yield from self._hop_families(names, streams)
        for name in names:
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
