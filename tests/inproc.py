"""Test helper: a real earshot Service running in this process (tiny model, real publishers, integrations)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from earshot.config import from_dict
from earshot.integrations import attach
from earshot.publish import Fanout, make_publishers
from earshot.service import Service


@contextmanager
def running_service(loaded: Any, raw: dict):
    """Build the config from `raw` (TOML-like dict), attach the integrations, start; stop on exit.

    Yields (service, integrations, fanout).
    """
    config = from_dict({"node": "testnode", "metrics": {"enabled": False}, **raw})
    fanout = Fanout(make_publishers(config))
    service = Service(config, loaded, fanout)
    integrations = attach(service, config, fanout)
    service.start()
    try:
        yield service, integrations, fanout
    finally:
        service.shutdown()
        integrations.close()


def demo_source(name: str = "yard") -> list[dict]:
    """One looping demo source (generated scene at real time)."""
    return [{"name": name, "kind": "demo", "loop": True}]
