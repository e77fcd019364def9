"""HTTP messages for the bounded server (httpd.py): the parsed request, a response, and small builders."""

from __future__ import annotations

import http.client
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    path: str
    """Decoded path without the query string."""
    query: dict[str, list[str]]
    headers: http.client.HTTPMessage
    body: bytes
    client: tuple


@dataclass
class Response:
    """What a handler returns; `detach` takes over the socket after the head (and body) are sent."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: list[tuple[str, str]] = field(default_factory=list)
    detach: Callable[[socket.socket, Callable[[], None]], None] | None = None
    """Called with (socket, release) instead of closing; `release()` must be called once the socket is closed."""
    length: bool = True
    """Send Content-Length (False for a stream)."""


def text(status: int, message: str) -> Response:
    """A short plain-text response."""
    return Response(status, (message + "\n").encode("utf-8"))


def _head(status: int, headers: list[tuple[str, str]]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _quick(status: int, extra: str = "") -> bytes:
    body = f"{status} {HTTPStatus(status).phrase}\n".encode()
    return _head(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                          ("Connection", "close")] + ([("Retry-After", extra)] if extra else [])) + body


def content(request: Request, body: bytes, content_type: str, cache: str = "no-cache") -> Response:
    """`body` as a 200, or a 206 for a single `Range: bytes=a-b` (the audio player seeks with these)."""
    headers = [("Accept-Ranges", "bytes"), ("Cache-Control", cache)]
    spec = request.headers.get("Range", "")
    if spec.startswith("bytes=") and "," not in spec:
        first, _, last = spec[6:].strip().partition("-")
        try:
            if first:
                a, b = int(first), (int(last) if last else len(body) - 1)
            else:
                a, b = max(0, len(body) - int(last)), len(body) - 1
        except ValueError:
            a, b = -1, -1
        b = min(b, len(body) - 1)
        if not 0 <= a <= b:
            return Response(416, b"", content_type, headers + [("Content-Range", f"bytes */{len(body)}")])
        return Response(206, body[a:b + 1], content_type, headers + [("Content-Range", f"bytes {a}-{b}/{len(body)}")])
    return Response(200, body, content_type, headers)
