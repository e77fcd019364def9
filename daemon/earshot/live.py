"""What the web page shows live: a service tap feeding Server-Sent Events, and the recent detections.

`WebTap` runs in the detection worker. Per hop it does nothing at all unless a page is connected
(one length check); then it queues the hop's fields, and the `LiveHub` thread builds the same
payload as the ZeroMQ score feed (`scores.scores_payload`, plus the level gate and the active
labels), encodes it once and writes it to every connected page without blocking: a page that
reads too slowly (over `MAX_PENDING_BYTES` behind) is dropped, never waited for. At most
`MAX_CLIENTS` pages are connected at once; more get 503.

`EventLog` keeps the latest `MAX_EVENTS` detections (start and end merged by id), seeded at start
from the clip index, so the events view survives a restart for detections that have a clip.
"""

from __future__ import annotations

import collections
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from .analyzer import Hop
from .events import END, START, Event
from .scores import scores_payload

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
"""Live pages connected at once."""
MAX_PENDING_BYTES = 512 * 1024
"""A page this far behind (bytes not yet taken by its socket) is dropped."""
QUEUE_ITEMS = 512
"""Hops and events waiting for the hub thread; the oldest are dropped beyond (only while pages are slow)."""
KEEPALIVE_S = 15.0
"""An SSE comment is sent this often so proxies keep the stream open and dead pages are noticed (s)."""
MAX_EVENTS = 1000
"""Detections kept for the events view."""


def _sse(kind: str, data: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode("utf-8")


class _Client:
    __slots__ = ("sock", "release", "pending")

    def __init__(self, sock: socket.socket, release: Callable[[], None]) -> None:
        self.sock, self.release = sock, release
        self.pending = bytearray()


class LiveHub:
    """Fans the live messages out to the connected pages from one thread."""

    def __init__(self, node: str, labels: list[str]) -> None:
        self.node, self.labels = node, list(labels)
        self.clients: list[_Client] = []
        self._lock = threading.Lock()
        self._items: collections.deque[tuple] = collections.deque(maxlen=QUEUE_ITEMS)
        self._wake = threading.Event()
        self._stop = False
        self.sent = 0
        """Messages written (counted once per page)."""
        self.dropped_clients = 0
        """Pages dropped for reading too slowly."""
        self._thread = threading.Thread(target=self._loop, name="earshot-live", daemon=True)
        self._thread.start()

    @property
    def listening(self) -> bool:
        """Whether any page is connected (read from the worker thread: a plain length read)."""
        return bool(self.clients)

    def full(self) -> bool:
        """No room for another page."""
        return len(self.clients) >= MAX_CLIENTS

    def add(self, sock: socket.socket, release: Callable[[], None], hello: dict) -> None:
        """Take over an SSE connection whose response head was sent (an httpd `detach` callback)."""
        sock.setblocking(False)
        client = _Client(sock, release)
        client.pending += b"retry: 2000\n\n" + _sse("hello", hello)
        with self._lock:
            self.clients.append(client)
        self._wake.set()

    def put(self, item: tuple) -> None:
        """Queue a ("hop", ...) or ("event", ...) item (worker thread; never blocks)."""
        self._items.append(item)
        self._wake.set()

    def _loop(self) -> None:
        last_ping = time.monotonic()
        while not self._stop:
            self._wake.wait(1.0)
            self._wake.clear()
            messages = []
            while self._items:
                try:
                    messages.append(self._encode(self._items.popleft()))
                except Exception:  # noqa: BLE001 - one bad item must not end the live view
                    log.exception("live feed: cannot encode an item")
            now = time.monotonic()
            if now - last_ping >= KEEPALIVE_S:
                last_ping = now
                messages.append(b": ping\n\n")
            with self._lock:
                clients = list(self.clients)
            self._drop_closed(clients)
            for client in clients:
                for m in messages:
                    client.pending += m
                self._flush(client)
            if any(c.pending for c in clients):
                time.sleep(0.02)  # a page behind: try again soon, without spinning
                self._wake.set()
        with self._lock:
            clients, self.clients = self.clients, []
        for client in clients:
            self._drop(client)

    def _drop_closed(self, clients: list[_Client]) -> None:
        """Drop pages whose browser hung up: a live page never sends after its request, so readable = closed."""
        poller = select.poll()
        for c in clients:
            poller.register(c.sock, select.POLLIN)
        gone = {fd for fd, _ in poller.poll(0)}
        for c in [c for c in clients if c.sock.fileno() in gone]:
            clients.remove(c)
            self._drop(c)

    def _flush(self, client: _Client) -> None:
        try:
            while client.pending:
                n = client.sock.send(client.pending)
                del client.pending[:n]
                self.sent += 1
        except (BlockingIOError, InterruptedError):
            if len(client.pending) > MAX_PENDING_BYTES:
                self.dropped_clients += 1
                log.info("live feed: a page was too slow and was dropped")
                self._drop(client)
        except OSError as e:
            log.debug("live feed: page gone: %s", e)
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        with self._lock:
            if client in self.clients:
                self.clients.remove(client)
        try:
            client.sock.close()
        finally:
            client.release()

    def _encode(self, item: tuple) -> bytes:
        if item[0] == "event":
            return _sse("detection", item[1])
        _, source, hop, wall, thresholds, active, gate = item
        msg = scores_payload(node=self.node, source=source, hop=hop, wall_s=wall, labels=self.labels,
                             thresholds=thresholds)
        msg["gate_dbfs"] = gate
        msg["active"] = active
        return _sse("hop", msg)

    def close(self, timeout_s: float = 1.0) -> None:
        """Drop every page and stop the thread (bounded)."""
        self._stop = True
        self._wake.set()
        self._thread.join(timeout_s)


class EventLog:
    """The latest detections, newest first; start and end of one detection are one record."""

    def __init__(self, seed: list[dict] | None = None) -> None:
        self._lock = threading.Lock()
        self._records: collections.OrderedDict[str, dict] = collections.OrderedDict()
        for meta in reversed(seed or []):  # the clip index is newest first
            eid = str(meta.get("event_id") or meta.get("id") or "")
            if eid:
                self._records[eid] = {
                    "id": eid, "source": meta.get("source"), "node": meta.get("node"), "label": meta.get("label"),
                    "score": meta.get("score"), "onset": meta.get("onset"), "onset_time": meta.get("onset_time"),
                    "offset": None, "duration_s": None, "clip": meta.get("id"), "active": False,
                }
        self._trim()

    def _trim(self) -> None:
        while len(self._records) > MAX_EVENTS:
            self._records.popitem(last=False)

    def add(self, event: Event) -> dict:
        """Record a start or end; returns the merged record (a copy)."""
        with self._lock:
            rec = self._records.get(event.id)
            if rec is None or event.type == START:
                rec = self._records[event.id] = {
                    "id": event.id, "source": event.source, "node": event.node, "label": event.label,
                    "score": event.score, "onset": event.onset, "onset_time": event.onset_time,
                    "offset": None, "duration_s": None, "clip": event.clip, "active": True,
                }
                self._trim()
            if event.type == END:
                rec.update(score=max(rec["score"] or 0.0, event.score), offset=event.offset, active=False,
                           offset_time=event.offset_time, clip=rec["clip"] or event.clip)
                if event.offset is not None:
                    rec["duration_s"] = round(event.offset - event.onset, 3)
            return dict(rec)

    def get(self, event_id: str) -> dict | None:
        """One record by event id."""
        with self._lock:
            rec = self._records.get(event_id)
            return dict(rec) if rec else None

    def by_clip(self, clip_id: str) -> dict | None:
        """The record of the detection that recorded `clip_id`."""
        with self._lock:
            return next((dict(r) for r in self._records.values() if r.get("clip") == clip_id), None)

    def recent(self, source: str | None = None, label: str | None = None, limit: int = MAX_EVENTS) -> list[dict]:
        """Records newest first, optionally only one source and/or label."""
        with self._lock:
            out = [dict(r) for r in reversed(self._records.values())
                   if (source is None or r["source"] == source) and (label is None or r["label"] == label)]
        return out[:limit]


class WebTap:
    """The service tap of the web page: events into the log, hops to the hub only while a page listens."""

    wants_audio = False

    def __init__(self, service: Any, hub: LiveHub, log_: EventLog) -> None:
        self.service, self.hub, self.events = service, hub, log_

    @property
    def wants_hops(self) -> bool:
        """Hops (and their spectrogram columns) only while a page is open: nothing is computed for none."""
        return bool(self.hub.clients)

    wants_mel = wants_hops

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Tap: nothing to do per block."""

    def on_hop(self, source: str, hop: Hop) -> None:
        """Tap: queue the hop for the pages; free when none is open."""
        if not self.hub.clients:
            return
        stream = self.service.stream(source)
        if stream is None:
            return
        a = stream.analyzer
        det = a.detector
        self.hub.put(("hop", source, hop, det.to_wall(hop.t_end), det.thresholds, det.active_labels,
                      a.min_level_dbfs))

    def on_event(self, event: Event) -> Event:
        """Tap: note the detection and push it to the pages (after the clip tap, so it has its clip id)."""
        record = self.events.add(event)
        if self.hub.clients:
            self.hub.put(("event", {"type": event.type, **record}))
        return event
