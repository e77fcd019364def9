"""Checks of a configuration against the model it will run: what `run` refuses, `check-config` refuses first.

`config.py` checks what the file alone can tell (types, ranges, paths); this module checks what needs
the model: the labels named in `[detect]` and the window length. Both `earshot run` (and its reload)
and `earshot check-config`, `detect`, `plot` and `monitor` call `model_problems`, so they agree.
"""

from __future__ import annotations

from typing import Any

from .config import Config, ConfigError


def model_problems(config: Config, loaded: Any) -> list[str]:
    """Every problem of `config` with the model `loaded`, one line each (empty if none)."""
    from .analyzer import hop_frames

    labels = list(loaded.labels)
    known = ", ".join(labels)
    problems = []
    for label in config.detect.labels:
        if label not in labels:
            problems.append(f"detect.labels: {label!r} is not a label of the model (its labels: {known})")
    for label in config.detect.thresholds:
        if label not in labels:
            problems.append(f"detect.thresholds: {label!r} is not a label of the model (its labels: {known})")
    try:
        hop_frames(config.frontend, loaded)
    except ConfigError as e:
        problems += e.problems
    return problems


def check(config: Config, loaded: Any) -> Config:
    """`config` if it suits the model, else ConfigError listing every problem."""
    problems = model_problems(config, loaded)
    if problems:
        raise ConfigError(problems)
    return config
