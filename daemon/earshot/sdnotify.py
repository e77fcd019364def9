"""systemd notification protocol (sd_notify) without a dependency: READY, WATCHDOG, STATUS."""

from __future__ import annotations

import logging
import os
import socket

_LOGGER = logging.getLogger(__name__)


class Notifier:
    """Sends sd_notify messages when run by systemd with Type=notify; does nothing otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        self.watchdog_s = int(usec) / 1e6 if usec.isdigit() and mine else None
        """The watchdog timeout systemd expects pings within (s), or None when there is none."""
        if self.address and self.address.startswith("@"):
            self.address = "\0" + self.address[1:]  # abstract socket namespace

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> bool:
        """Send one message (e.g. "READY=1"); returns whether it was sent."""
        if self.address is None:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message.encode(), self.address)
            return True
        except OSError as e:
            _LOGGER.warning("cannot notify systemd at %s: %s", self.address, e)
            return False

    def ready(self, status: str = "") -> None:
        self.notify("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self) -> None:
        self.notify("STOPPING=1")

    def watchdog(self) -> None:
        self.notify("WATCHDOG=1")

    def status(self, text: str) -> None:
        self.notify(f"STATUS={text}")
