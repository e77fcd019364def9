"""The web page: live view, events with their clips, run-time control; served by the daemon on one port.

Routes (all on the bounded server, `httpd.py`):
- `GET /` the page (or, when a token is set and the browser has none, the sign-in form);
  `GET /static/app.js|style.css` its script and style (shipped in the package, no build step);
- `GET /live` Server-Sent Events: `hello` (the state), `hop` per hop and source (the ZeroMQ score
  feed's payload plus `gate_dbfs` and `active`), `detection` per start and end;
- `GET /api/state`, `GET /api/events?source=&label=` (newest first), `POST /api/control`;
- `GET /clips/`, `/clips/<id>.flac|json|png` (the PNG is the clip's spectrogram, rendered once);
- `POST /login` (form field `token`) sets an HttpOnly, SameSite=Strict session cookie; `POST /logout`.

Access: with `[web] token_file`, every route but the sign-in form and the style sheet needs the
session cookie or `Authorization: Bearer <token>`; without it (allowed on loopback only, see
config.py) everything but control is open to local users. Control (`POST /api/control`) needs a
token: it goes through `control.Control`, the same path as the MQTT `/set` topics (persisted,
retained topics republished, Home Assistant follows them).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import tempfile
import threading
import time
from http.cookies import CookieError, SimpleCookie
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from . import __version__
from .clips import CLIP_ID_RE, clip_index, clip_response
from .config import is_loopback, read_token, split_listen, web_listen
from .detect import make_rules
from .httpd import BoundedServer, Request, Response, content, text
from .live import EventLog, LiveHub, WebTap

log = logging.getLogger(__name__)

SESSION_COOKIE = "earshot_session"
"""Name of the session cookie set by `POST /login`."""
_STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
_SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


def _static(name: str) -> bytes:
    return resources.files("earshot").joinpath("static", name).read_bytes()


def _json(data: Any, status: int = 200) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode("utf-8"), "application/json",
                    [("Cache-Control", "no-store")])


class Auth:
    """The token check: a Bearer header or the session cookie derived from the token."""

    def __init__(self, token: str | None) -> None:
        self.token = token
        self.session = (hmac.new(token.encode("utf-8"), b"earshot web session 1", hashlib.sha256).hexdigest()
                        if token else "")
        self._last_failure = 0.0

    @property
    def required(self) -> bool:
        """Whether requests need the token."""
        return self.token is not None

    def ok(self, request: Request) -> bool:
        """Whether `request` carries the token (always true without one)."""
        if self.token is None:
            return True
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and hmac.compare_digest(header[7:].strip().encode(), self.token.encode()):
            return True
        try:
            morsel = SimpleCookie(request.headers.get("Cookie", "")).get(SESSION_COOKIE)
        except CookieError:
            return False
        return morsel is not None and hmac.compare_digest(morsel.value.encode(), self.session.encode())

    def login(self, request: Request) -> Response:
        """`POST /login`: a session cookie for the right token; at most one wrong try per second."""
        now = time.monotonic()
        if now - self._last_failure < 1.0:
            return text(429, "too many attempts; wait a second")
        form = parse_qs(request.body.decode("utf-8", "replace"))
        given = (form.get("token") or [""])[0].strip()
        if self.token is None or not hmac.compare_digest(given.encode(), self.token.encode()):
            self._last_failure = now
            log.warning("web: wrong token from %s", request.client[0])
            return Response(303, b"", headers=[("Location", "/?failed=1")])
        cookie = f"{SESSION_COOKIE}={self.session}; Path=/; HttpOnly; SameSite=Strict"
        if request.headers.get("X-Forwarded-Proto", "") == "https":
            cookie += "; Secure"
        return Response(303, b"", headers=[("Location", "/"), ("Set-Cookie", cookie)])


class WebApp:
    """Routes requests to the page, the live feed, the events, control and the clips."""

    def __init__(self, service: Any, config: Any, control: Any, clip_dir: Path | None, serve_clips: bool,
                 live: bool, token: str | None) -> None:
        self.service, self.config, self.control = service, config, control
        self.clip_dir = clip_dir.resolve() if clip_dir is not None else None
        self.serve_clips = serve_clips and self.clip_dir is not None
        self.live = live
        self.auth = Auth(token)
        self.labels = list(make_rules(service.loaded.labels, service.loaded.thresholds, config.detect))
        seed = clip_index(self.clip_dir) if self.clip_dir is not None and self.clip_dir.is_dir() else []
        self.events = EventLog(seed)
        self.hub = LiveHub(config.node, list(service.loaded.labels)) if live else None
        self.tap = WebTap(service, self.hub, self.events) if live else None
        self._render_lock = threading.Lock()  # one spectrogram at a time: bounded CPU beside the detector
        self._pages = {name: _static(name) for name in ("index.html", "login.html", *_STATIC)} if live else {}

    # ------------------------------------------------------------------ routing

    def handle(self, request: Request) -> Response:
        """Answer one request (in a pool thread)."""
        path, method = request.path, request.method
        if method == "POST" and path == "/login" and self.live:
            return self.auth.login(request)
        if method in ("GET", "HEAD") and path == "/static/style.css" and self.live:
            return Response(200, self._pages["style.css"], _STATIC["style.css"], [("Cache-Control", "no-cache")])
        if not self.auth.required and not _loopback_host(request.headers.get("Host", "")):
            # No token: only names of this machine, so a web site cannot reach the page by DNS rebinding.
            return text(403, "without [web] token_file the page answers only to localhost / 127.0.0.1 / [::1]")
        authorised = self.auth.ok(request)
        if not authorised:
            if method in ("GET", "HEAD") and path == "/" and self.live:
                page = self._pages["login.html"]
                if "failed" in request.query:
                    page = page.replace(b"<!--message-->", b'<p class="note" role="alert">Wrong token.</p>')
                return Response(200, page, "text/html; charset=utf-8", [("Cache-Control", "no-store"),
                                                                          *_SECURITY_HEADERS])
            return Response(401, b"a token is needed (sign in at /)\n",
                            headers=[("WWW-Authenticate", 'Bearer realm="earshot"')])
        if path.startswith("/clips/") or path == "/clips":
            if not self.serve_clips:
                return text(404, "clips are not served ([clips] enabled/http)")
            if method not in ("GET", "HEAD"):
                return text(405, "method not allowed")
            if path.endswith(".png"):
                return self._clip_png(request)
            assert self.clip_dir is not None
            return clip_response(self.clip_dir, request)
        if not self.live:
            return text(404, "not found")
        if method == "POST":
            if path == "/api/control":
                return self._control(request)
            if path == "/logout":
                return Response(303, b"", headers=[("Location", "/"),
                                                   ("Set-Cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0")])
            return text(404, "not found")
        if method not in ("GET", "HEAD"):
            return text(405, "method not allowed")
        if path == "/":
            return Response(200, self._pages["index.html"], "text/html; charset=utf-8",
                            [("Cache-Control", "no-cache"), *_SECURITY_HEADERS])
        if path.startswith("/static/") and path[8:] in _STATIC:
            return Response(200, self._pages[path[8:]], _STATIC[path[8:]], [("Cache-Control", "no-cache")])
        if path == "/api/state":
            return _json(self.state())
        if path == "/api/events":
            q = request.query
            return _json({"events": self.recent((q.get("source") or [None])[0], (q.get("label") or [None])[0])})
        if path == "/live":
            return self._live()
        return text(404, "not found")

    # ------------------------------------------------------------------ data

    def state(self) -> dict:
        """What the page needs to draw itself: sources, labels, thresholds, gate, capabilities."""
        sources = []
        for s in self.service.config.active_sources:  # the service's: a reload may add sources
            stream = self.service.stream(s.name)
            gate = stream.analyzer.min_level_dbfs if stream is not None else self.config.detect.min_level_dbfs
            sources.append({"name": s.name, "kind": s.kind, "enabled": self.control.enabled(s.name),
                            "gate_dbfs": gate,
                            "thresholds": {lab: round(self.control.threshold(s.name, lab), 4) for lab in self.labels}})
        p = self.service.loaded.frontend
        return {"node": self.config.node, "version": __version__, "labels": self.labels,
                "model_labels": list(self.service.loaded.labels), "sources": sources, "n_mels": p.n_mels,
                "hop_s": self.config.frontend.chunk_hop, "clips": self.serve_clips,
                "clip_post_s": self.config.clips.post_s, "auth": self.auth.required,
                "can_control": self.auth.required}

    def recent(self, source: str | None, label: str | None) -> list[dict]:
        """The events view's records, each with whether its clip can be played yet."""
        out = self.events.recent(source, label)
        for rec in out:
            clip = rec.get("clip")
            rec["clip_ready"] = bool(self.serve_clips and clip and CLIP_ID_RE.match(clip)
                                     and (self.clip_dir / f"{clip}.flac").is_file())
        return out

    def _live(self) -> Response:
        assert self.hub is not None
        if self.hub.full():
            return Response(503, b"too many live pages open\n", headers=[("Retry-After", "5")])
        hello = self.state()
        return Response(200, b"", "text/event-stream", [("Cache-Control", "no-store"), ("X-Accel-Buffering", "no"),
                                                         ("Connection", "close")],
                        detach=lambda sock, release: self.hub.add(sock, release, hello), length=False)

    def _control(self, request: Request) -> Response:
        if not self.auth.required:
            return _json({"error": "control from the page needs [web] token_file"}, 403)
        origin = request.headers.get("Origin")
        if origin and urlsplit(origin).netloc != request.headers.get("Host", ""):
            return _json({"error": "cross-origin request refused"}, 403)
        if "application/json" not in request.headers.get("Content-Type", ""):
            return _json({"error": "send JSON"}, 415)
        try:
            cmd = json.loads(request.body or b"{}")
            source = str(cmd["source"])
        except (ValueError, KeyError, TypeError):
            return _json({"error": "expected {\"source\": ..., \"enabled\"|\"label\"+\"threshold\": ...}"}, 400)
        error = None
        if "enabled" in cmd:
            value = cmd["enabled"]
            error = self.control.set_enabled(source, {True: "ON", False: "OFF"}.get(value, str(value)))
        if error is None and "threshold" in cmd:
            error = self.control.set_threshold(source, str(cmd.get("label", "")), str(cmd["threshold"]))
        if error:
            return _json({"error": error}, 400)
        shown = {k: str(cmd[k])[:40] for k in ("source", "enabled", "label", "threshold") if k in cmd}
        log.info("web: control %s from %s", shown, request.client[0])
        return _json({"ok": True, "state": self.state()})

    def _clip_png(self, request: Request) -> Response:
        """The clip's spectrogram with the detection marked; rendered once, then served from the cache."""
        import numpy as np
        import soundfile as sf

        from .clipimage import spectrogram_png

        assert self.clip_dir is not None
        clip_id = request.path[len("/clips/"):-len(".png")]
        if not CLIP_ID_RE.match(clip_id):
            return text(404, "not found")
        png, flac = self.clip_dir / f"{clip_id}.png", self.clip_dir / f"{clip_id}.flac"
        with self._render_lock:
            if png.is_file():
                return content(request, png.read_bytes(), "image/png", cache="private, max-age=86400")
            try:
                meta = json.loads((self.clip_dir / f"{clip_id}.json").read_text(encoding="utf-8"))
                audio, _sr = sf.read(flac, dtype="float32", always_2d=False)
            except (OSError, ValueError, RuntimeError):
                return text(404, "not found")
            record = self.events.by_clip(clip_id)
            start = float(meta.get("clip_start", 0.0))
            onset = float(meta.get("onset", start)) - start
            end = record["offset"] - start if record and record.get("offset") is not None else None
            body = spectrogram_png(np.asarray(audio).reshape(-1), self.service.loaded.frontend, (onset, end))
            if record is None or not record.get("active"):  # final: the detection has ended (or is long past)
                _write_atomic(png, body)
        return content(request, body, "image/png", cache="no-cache")

    def close(self) -> None:
        """Drop the live pages."""
        if self.hub is not None:
            self.hub.close()


def _loopback_host(host: str) -> bool:
    """Whether a Host header names this machine by a loopback name or address (a port may follow)."""
    try:
        name = urlsplit("//" + host).hostname or ""
    except ValueError:
        return False
    return is_loopback(name)


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("cannot cache the spectrogram %s: %s", path, e)


class WebServer:
    """The web app on the bounded server; `close()` once the service has stopped."""

    def __init__(self, service: Any, config: Any, control: Any, clip_dir: Path | None, serve_clips: bool) -> None:
        """Bind and serve; raises OSError (address) or ValueError (token file), each with a one-line reason."""
        w = config.web
        token = read_token(w.token_file) if w.token_file else None
        self.app = WebApp(service, config, control, clip_dir, serve_clips, w.enabled, token)
        address = split_listen(web_listen(config), any_port=True)
        assert address is not None, "config validation checks web.listen"
        self.server = BoundedServer(address[0], address[1], self.app.handle, name="web", workers=w.workers,
                                    max_connections=w.max_connections, timeout_s=w.timeout_s)
        self.host, self.port = self.server.host, self.server.port
        if self.app.tap is not None:
            service.taps.append(self.app.tap)  # after the clip tap: events carry their clip id
        host = f"[{self.host}]" if ":" in self.host else self.host
        log.info("web page on http://%s:%s/%s", host, self.port, " (token required)" if token else "")

    def close(self, timeout_s: float = 2.0) -> None:
        """Stop serving and drop the live pages (bounded)."""
        self.server.close(timeout_s)
        self.app.close()
