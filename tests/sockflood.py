"""Test helper: many idle TCP connections, as a flood of clients that connect and never speak."""

from __future__ import annotations

import resource
import socket


def raise_nofile(n: int) -> int:
    """Raise this process's open-file limit towards `n` (not above the hard limit); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_connections(port: int, n: int) -> list[socket.socket]:
    """`n` non-blocking connections to 127.0.0.1:`port` that send nothing; the caller closes them."""
    out = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        out.append(s)
    return out
