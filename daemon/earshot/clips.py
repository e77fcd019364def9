"""Evidence clips: a FLAC file of the audio around each detection, and a read-only HTTP server.

`ClipRecorder` is a service tap. It keeps the last few seconds of every source in a ring; on a
`start` event it notes the clip `[onset - pre_s, onset + post_s]` and stamps the event (and its
`end`) with the clip id, which is the event id. When the post-roll has been heard (or at
shutdown, with what there is) the samples are copied out and a writer thread encodes
`<dir>/<id>.flac` plus `<dir>/<id>.json` (metadata), both written atomically. Retention, after
every clip and at start: clips older than `max_age_days` go, then the oldest until the total is
under `max_total_mb`.

`clip_response` answers `GET /clips/` (a JSON index, newest first), `GET /clips/<id>.flac` and
`GET /clips/<id>.json`; anything else is 404. The web server (`web.py`) serves it; `ClipServer`
serves it alone on the same bounded server. Ids are matched against `[0-9A-Za-z_-]{1,64}`, so
no request can name a file outside the clip directory.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import queue
import re
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf

from .analyzer import Hop
from .events import START, Event
from .httpd import BoundedServer, Request, Response, content, text
from .statedir import ensure_private_dir

log = logging.getLogger(__name__)

CLIP_ID_RE = re.compile(r"^[0-9A-Za-z_-]{1,64}$")
"""What a clip id may look like (event ids are 32 hex digits)."""

_MARGIN_S = 5.0
"""History kept beyond pre_s + post_s (s): covers the detection delay after the onset."""


class _Ring:
    """The latest `capacity` samples of one source, addressed by absolute sample index."""

    def __init__(self, capacity: int) -> None:
        self.buf = np.zeros(capacity, dtype=np.float32)
        self.total = 0  # samples ever written

    def write(self, x: np.ndarray) -> None:
        n, cap = len(x), len(self.buf)
        if n >= cap:
            self.buf[np.arange(self.total + n - cap, self.total + n) % cap] = x[-cap:]
        else:
            i = self.total % cap
            first = min(n, cap - i)
            self.buf[i:i + first] = x[:first]
            self.buf[:n - first] = x[first:]
        self.total += n

    def read(self, a: int, b: int) -> np.ndarray:
        """Samples [a, b) clipped to what is still held."""
        cap = len(self.buf)
        a, b = max(a, self.total - cap, 0), min(b, self.total)
        if b <= a:
            return np.zeros(0, dtype=np.float32)
        idx = np.arange(a, b) % cap
        return self.buf[idx].copy()


@dataclass
class _Pending:
    """A clip waiting for its post-roll."""

    clip_id: str
    source: str
    a: int
    b: int
    meta: dict


class ClipRecorder:
    """Records clips around events; a service tap (fast in the worker, encoding in its own thread)."""

    wants_hops = False
    wants_mel = False
    in_worker = True
    """With worker processes, each runs its own recorder (built from `worker_spec()`): the audio stays there."""

    def __init__(self, directory: str | os.PathLike, sample_rate: int, pre_s: float, post_s: float,
                 max_total_bytes: int, max_age_s: float) -> None:
        """Create the directory, start the writer thread and apply retention once."""
        self.dir = ensure_private_dir(directory)
        self.sr = int(sample_rate)
        self.pre_s, self.post_s = float(pre_s), float(post_s)
        self.max_total_bytes = int(max_total_bytes)
        self.max_age_s = float(max_age_s)
        self._capacity = int((self.pre_s + self.post_s + _MARGIN_S) * self.sr)
        self._rings: dict[str, _Ring] = {}
        self._pending: list[_Pending] = []
        self._ids: dict[str, str] = {}  # event id -> clip id, until the event's end
        self._queue: queue.Queue[tuple[str, np.ndarray, dict] | None] = queue.Queue(maxsize=64)
        self.written = 0
        """Clips written."""
        self.failed = 0
        """Clips not written (encoder queue full, disk error)."""
        self._writer = threading.Thread(target=self._write_loop, name="earshot-clips", daemon=True)
        self._writer.start()
        self._queue.put(("", np.zeros(0, dtype=np.float32), {}))  # retention pass at start

    def worker_spec(self) -> tuple:
        """Constructor arguments of an equal recorder in a worker process."""
        return (str(self.dir), self.sr, self.pre_s, self.post_s, self.max_total_bytes, self.max_age_s)

    # ------------------------------------------------------------------ tap (worker thread)

    def on_audio(self, source: str, samples: np.ndarray) -> None:
        """Tap: keep the history; hand over clips whose post-roll is complete."""
        ring = self._rings.get(source)
        if ring is None:
            ring = self._rings[source] = _Ring(self._capacity)
        ring.write(np.asarray(samples, dtype=np.float32).reshape(-1))
        if self._pending:
            for p in [p for p in self._pending if p.source == source and ring.total >= p.b]:
                self._pending.remove(p)
                self._hand_over(p, ring)

    def on_hop(self, source: str, hop: Hop) -> None:
        """Tap: nothing to do per hop."""

    def on_event(self, event: Event) -> Event:
        """Tap: stamp the event with its clip id (the start notes the clip to record)."""
        if event.type == START:
            ring = self._rings.get(event.source)
            total = ring.total if ring else 0
            a = max(0, round((event.onset - self.pre_s) * self.sr))
            b = max(a + 1, round((event.onset + self.post_s) * self.sr))
            if a < total - self._capacity:
                a = total - self._capacity  # detected so late that the pre-roll is gone already
            clip_id = event.id if CLIP_ID_RE.match(event.id) else re.sub(r"[^0-9A-Za-z_-]", "_", event.id)[:64]
            meta = {"id": clip_id, "event_id": event.id, "source": event.source, "node": event.node,
                    "label": event.label, "score": event.score, "onset_time": event.onset_time,
                    "clip_start": round(a / self.sr, 3), "onset": event.onset, "sample_rate": self.sr}
            self._pending.append(_Pending(clip_id, event.source, a, b, meta))
            self._ids[event.id] = clip_id
            return replace(event, clip=clip_id)
        clip_id = self._ids.pop(event.id, None)
        return replace(event, clip=clip_id) if clip_id else event

    def _hand_over(self, p: _Pending, ring: _Ring) -> None:
        audio = ring.read(p.a, p.b)
        p.meta["duration_s"] = round(len(audio) / self.sr, 3)
        try:
            self._queue.put_nowait((p.clip_id, audio, p.meta))
        except queue.Full:
            self.failed += 1
            log.warning("clip %s dropped: the clip writer is behind", p.clip_id)

    # ------------------------------------------------------------------ writer thread

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            clip_id, audio, meta = item
            if clip_id:
                try:
                    self._write(clip_id, audio, meta)
                    self.written += 1
                except OSError as e:
                    self.failed += 1
                    full = e.errno in (errno.ENOSPC, errno.EDQUOT)
                    log.error("cannot write clip %s in %s: %s%s", clip_id, self.dir, e.strerror or e,
                              " (ENOSPC: the disk is full; free space or lower [clips] max_total_mb)" if full else "")
                except (RuntimeError, sf.LibsndfileError) as e:
                    self.failed += 1
                    log.error("cannot encode clip %s: %s", clip_id, e)
            try:
                self.retain()
            except OSError as e:
                log.warning("clip retention in %s failed: %s", self.dir, e)

    def _write(self, clip_id: str, audio: np.ndarray, meta: dict) -> None:
        meta = {**meta, "created": time.time()}
        # Encode in memory, then write the bytes ourselves: libsndfile reports a full disk as a
        # codec error ("problem with initialization of the flac decoder"); a plain write says ENOSPC.
        flac = io.BytesIO()
        sf.write(flac, np.clip(audio, -1.0, 1.0), self.sr, format="FLAC", subtype="PCM_16")
        self._write_file(clip_id, ".flac", flac.getvalue())
        self._write_file(clip_id, ".json", json.dumps(meta).encode("utf-8"))
        log.debug("clip %s written (%.1f s)", clip_id, meta["duration_s"])

    def _write_file(self, clip_id: str, suffix: str, data: bytes) -> None:
        """`<dir>/<clip_id><suffix>` replaced atomically (mode 0600); nothing is left behind on failure."""
        fd, tmp = tempfile.mkstemp(prefix=f".{clip_id}.", suffix=suffix, dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.dir / f"{clip_id}{suffix}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def retain(self) -> list[str]:
        """Delete clips past `max_age_s`, then the oldest beyond `max_total_bytes`; returns the deleted ids."""
        clips = []
        for f in self.dir.glob("*.flac"):
            if f.name.startswith("."):
                continue
            try:
                st = f.stat()
            except FileNotFoundError:
                continue
            clips.append((st.st_mtime, st.st_size, f))
        clips.sort()
        total = sum(size for _, size, _ in clips)
        now = time.time()
        deleted = []
        for mtime, size, f in clips:
            if now - mtime > self.max_age_s or total > self.max_total_bytes:
                f.unlink(missing_ok=True)
                f.with_suffix(".json").unlink(missing_ok=True)
                f.with_suffix(".png").unlink(missing_ok=True)  # the web page's spectrogram, if rendered
                total -= size
                deleted.append(f.stem)
        if deleted:
            log.info("clip retention deleted %d clip(s)", len(deleted))
        return deleted

    def close(self, timeout_s: float = 5.0) -> None:
        """Write the clips still waiting for post-roll with the audio there is, then stop the writer."""
        for p in self._pending:
            ring = self._rings.get(p.source)
            if ring is not None:
                self._hand_over(p, ring)
        self._pending.clear()
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            log.warning("the clip writer is stuck; not waiting for it")
            return
        self._writer.join(timeout_s)
        if self._writer.is_alive():
            log.warning("the clip writer did not finish within %.0f s", timeout_s)


def clip_index(directory: Path) -> list[dict]:
    """The metadata of every clip in `directory`, newest first."""
    out = []
    for f in directory.glob("*.json"):
        if f.name.startswith(".") or not f.with_suffix(".flac").exists():
            continue
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    out.sort(key=lambda m: m.get("created", 0.0), reverse=True)
    return out


def clip_response(root: Path, request: Request) -> Response:
    """`GET /clips/` (the index), `/clips/<id>.flac` or `/clips/<id>.json` from `root`; 404 for anything else."""
    path = request.path
    if path in ("/clips", "/clips/"):
        return Response(200, json.dumps({"clips": clip_index(root)}).encode("utf-8"), "application/json")
    m = re.match(r"^/clips/([^/]+)\.(flac|json)$", path)
    if not m or not CLIP_ID_RE.match(m.group(1)):
        return text(404, "not found")
    file = root / f"{m.group(1)}.{m.group(2)}"
    try:
        if file.resolve().parent != root or not file.is_file():
            return text(404, "not found")
        body = file.read_bytes()
    except OSError:
        return text(404, "not found")
    return content(request, body, "audio/flac" if m.group(2) == "flac" else "application/json",
                   cache="private, max-age=86400")


class ClipServer:
    """Read-only HTTP access to the clips alone, on the bounded server (the web page serves them otherwise)."""

    def __init__(self, directory: str | os.PathLike, host: str, port: int, **limits: Any) -> None:
        """Bind `host:port` (port 0 = any free one); raises OSError if it cannot. `limits`: see BoundedServer."""
        root = Path(directory).resolve()

        def handle(request: Request) -> Response:
            if request.method not in ("GET", "HEAD"):
                return text(405, "method not allowed")
            return clip_response(root, request)

        self._server = BoundedServer(host, int(port), handle, name="clips", **limits)
        self.host, self.port = self._server.host, self._server.port
        """Bound address (the real port when 0 was asked)."""
        log.info("serving clips on http://%s:%s/clips/", self.host, self.port)

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop serving (bounded)."""
        self._server.close(timeout_s)
