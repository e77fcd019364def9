"""earshot: real-time sound event detection (gunshot, alarm, glass break) as a Linux service."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("earshot")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"
