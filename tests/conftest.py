"""Shared fixtures. Helpers live beside the tests: brokers.py (Mosquitto), pulse.py (PulseAudio),
tinymodel.py (a tiny model trained on generated sounds, so the suite needs no training data)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # training and evaluation programs are importable in tests


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny model trained once per session on synthetic alarm/glass/gunshot sounds."""
    from tinymodel import train_tiny_checkpoint

    return train_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint, loaded."""
    from earshot.model import load_checkpoint

    return load_checkpoint(tiny_checkpoint)
