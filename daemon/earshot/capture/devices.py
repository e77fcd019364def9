"""Audio input devices: importing PortAudio, listing input devices and resolving a configured `device`."""

from __future__ import annotations

import logging
from typing import Any

from .base import CaptureError

_LOGGER = logging.getLogger(__name__)


def _sd() -> Any:
    """Import sounddevice, turning a missing PortAudio into a CaptureError."""
    try:
        import sounddevice
    except OSError as exc:  # libportaudio2 missing
        raise CaptureError(f"PortAudio is not available ({exc}): install libportaudio2") from exc
    return sounddevice


def _input_devices(sd: Any) -> list[tuple[int, dict[str, Any]]]:
    """(index, info) of every device with input channels."""
    return [(i, dict(d)) for i, d in enumerate(sd.query_devices()) if d["max_input_channels"] > 0]


def resolve_input_device(device: str | int | None) -> tuple[int, dict[str, Any]]:
    """Find the input device for a config value (index, name substring or None = default)."""
    sd = _sd()
    inputs = _input_devices(sd)
    hint = "run `earshot devices` to list them"
    if not inputs:
        raise CaptureError("no audio input device found: plug in a microphone, or use a file/ffmpeg/demo source")
    if device is None:
        idx = sd.default.device[0]
        if idx is None or idx < 0:
            idx = inputs[0][0]
        return _check_input(sd, int(idx), hint)
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        return _check_input(sd, int(device), hint)
    wanted = str(device).lower()
    exact = [(i, d) for i, d in inputs if str(d["name"]).lower() == wanted]
    matches = exact or [(i, d) for i, d in inputs if wanted in str(d["name"]).lower()]
    if not matches:
        raise CaptureError(f"no input device matches '{device}': {hint}")
    if len(matches) > 1:
        _LOGGER.info(
            "device '%s' matches %s; using the first",
            device,
            ", ".join(f"{i} ({d['name']})" for i, d in matches),
        )
    return matches[0]


def _check_input(sd: Any, idx: int, hint: str) -> tuple[int, dict[str, Any]]:
    """Validate a device index as an input device."""
    try:
        info = dict(sd.query_devices(idx))
    except (ValueError, sd.PortAudioError) as exc:
        raise CaptureError(f"there is no audio device {idx}: {hint}") from exc
    if info["max_input_channels"] <= 0:
        raise CaptureError(f"audio device {idx} ({info['name']}) has no input channels: {hint}")
    return idx, info



def list_devices() -> str:
    """A readable table of the audio input devices PortAudio sees (for `earshot devices`)."""
    try:
        sd = _sd()
        inputs = _input_devices(sd)
        default_in = sd.default.device[0]
    except CaptureError as exc:
        return str(exc)
    except Exception as exc:  # PortAudioError while querying: report instead of a traceback
        return f"cannot list audio devices: {exc}"
    if not inputs:
        return "no audio input devices found: plug in a microphone (check `arecord -l`), or use a file, ffmpeg or demo source"
    rows = [("", "index", "name", "channels", "default rate")]
    for i, d in inputs:
        rows.append(
            (
                "*" if i == default_in else "",
                str(i),
                str(d["name"]),
                str(d["max_input_channels"]),
                f"{float(d['default_samplerate']):.0f} Hz",
            )
        )
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    lines.append("(* = default input; set `device` to an index or part of a name)")
    return "\n".join(lines)


def has_input_device() -> bool:
    """Whether PortAudio sees at least one input device (else `make run` falls back to the demo)."""
    try:
        return bool(_input_devices(_sd()))
    except Exception:  # no PortAudio or a broken driver both mean "no usable input"
        return False
