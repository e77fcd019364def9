"""Shared fixtures. Helpers live beside the tests: brokers.py (Mosquitto), pulse.py (PulseAudio),
tinymodel.py (a tiny model trained on generated sounds, so the suite needs no training data)."""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))  # training and evaluation programs are importable in tests

from brokers import closing, mosquitto, mosquitto_factory  # noqa: E402,F401  (fixtures: a real broker per test)


# The tiny model depends only on these files; its checkpoint is cached under that key so a rerun
# skips the ~30 s of training (a fresh clone trains it once).
_TINY_INPUTS = ("tests/tinymodel.py", "tools/train.py", "tools/augment.py", "daemon/earshot/model/cnn.py",
                "daemon/earshot/model/spec.py", "daemon/earshot/features.py", "daemon/earshot/synth.py",
                "daemon/earshot/model/checkpoint.py", "tools/data.py", "tools/mining.py")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, request) -> Path:
    """A tiny model trained once on synthetic alarm/glass/gunshot sounds."""
    import torch
    from tinymodel import train_tiny_checkpoint

    key = hashlib.sha256(torch.__version__.encode())
    for name in _TINY_INPUTS:
        key.update((ROOT / name).read_bytes())
    cached = Path(request.config.cache.mkdir("earshot-tiny-model")) / f"{key.hexdigest()[:16]}.pt"
    if not cached.exists():
        trained = train_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.pt")
        shutil.copy(trained, cached)
    return cached


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    """The tiny checkpoint, loaded."""
    from earshot.model.checkpoint import load_checkpoint

    return load_checkpoint(tiny_checkpoint)
