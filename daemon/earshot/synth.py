"""Procedural sounds: T3 smoke alarms, sirens, gunshots, glass breaking and room background.

Used by the daemon's demo source (a machine without a microphone still shows
detections), by the tests (a tiny model is trained on these sounds) and by training
augmentation. Every generator takes a `numpy.random.Generator` and a sample rate and
returns float32 mono with peak <= 1, so the same seed always gives the same samples.
The sounds are plausible, not recordings: each has the acoustic traits a detector
keys on (a T3 alarm's ~3.1 kHz on/off pattern, a gunshot's broadband impulse and
boom, glass's high ringing partials), with randomised details so that a model
cannot memorise one waveform.
"""

from __future__ import annotations

import numpy as np
from scipy.signal import butter, lfilter, sosfilt

LABELS = ("alarm", "glass_break", "gunshot")
"""Labelled event kinds placed by `scene` (sirens and clutter are unlabelled distractors)."""

T3_BEEP_S = 0.5
"""Length of one T3 beep and of the gap between beeps (seconds, ISO 8201 temporal-three)."""
T3_PAUSE_S = 1.5
"""Silence after the third beep of a T3 cycle (seconds)."""
T3_CYCLE_S = 6 * T3_BEEP_S - T3_BEEP_S + T3_PAUSE_S
"""Length of one T3 cycle: beep gap beep gap beep pause = 4.0 s."""

_PEAK = 0.9  # generators normalise events to this peak, leaving headroom for mixing


def _normalize(x: np.ndarray, peak: float = _PEAK) -> np.ndarray:
    """Scale to the given peak (silence stays silence) and return float32."""
    m = float(np.max(np.abs(x))) if x.size else 0.0
    if m > 0.0:
        x = x * (peak / m)
    return np.asarray(x, dtype=np.float32)


def _ramp_gate(n: int, sr: int, ramp_s: float = 0.005) -> np.ndarray:
    """A length-n envelope of ones with raised-cosine ramps at both ends (no clicks)."""
    env = np.ones(n)
    r = min(n // 2, max(1, int(round(ramp_s * sr))))
    ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(r) / r)
    env[:r] = ramp
    env[n - r :] = ramp[::-1]
    return env


def _band(x: np.ndarray, sr: int, lo: float | None, hi: float | None, order: int = 4) -> np.ndarray:
    """Butterworth band-, high- or low-pass filter, with edges clamped below Nyquist."""
    nyq = sr / 2.0
    if hi is not None and hi >= 0.95 * nyq:
        hi = None
    if lo is not None and hi is None:
        sos = butter(order, lo / nyq, btype="highpass", output="sos")
    elif lo is None and hi is not None:
        sos = butter(order, hi / nyq, btype="lowpass", output="sos")
    elif lo is not None and hi is not None:
        sos = butter(order, [lo / nyq, hi / nyq], btype="bandpass", output="sos")
    else:
        return x
    return sosfilt(sos, x)


def _trim_tail(x: np.ndarray, sr: int, floor_db: float = -60.0) -> np.ndarray:
    """Cut the trailing part that stays below `floor_db` relative to the peak (10 ms resolution)."""
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0:
        return x
    above = np.nonzero(np.abs(x) > peak * 10 ** (floor_db / 20))[0]
    end = min(x.shape[0], int(above[-1]) + int(0.01 * sr) + 1)
    return x[:end]


def _partials(sr: int, t: np.ndarray, f0: float, amps: tuple[float, ...]) -> np.ndarray:
    """Sum of harmonics k*f0 (k = 1..len(amps)) that lie below 0.45*sr."""
    out = np.zeros_like(t)
    for k, a in enumerate(amps, start=1):
        if k * f0 < 0.45 * sr:
            out += a * np.sin(2 * np.pi * k * f0 * t + k * 0.7)
    return out


# -- alarms --------------------------------------------------------------------------


def t3_alarm(sr: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """A smoke/CO alarm: ~3.1 kHz piezo tone in the T3 pattern (3 x 0.5 s beeps, 0.5 s gaps, 1.5 s pause).

    The pattern starts with a beep at t=0 and repeats every 4 s; the fundamental is
    drawn within +-4 % of 3.1 kHz with a little per-beep drift, plus 2nd/3rd harmonics.
    """
    n = int(round(duration_s * sr))
    out = np.zeros(n)
    f0 = 3100.0 * (1.0 + rng.uniform(-0.04, 0.04))
    amps = (1.0, rng.uniform(0.1, 0.4), rng.uniform(0.05, 0.2))
    beep_n = int(round(T3_BEEP_S * sr))
    t = np.arange(beep_n) / sr
    cycle = 0
    while True:
        for b in range(3):
            start = int(round((cycle * T3_CYCLE_S + 2 * b * T3_BEEP_S) * sr))
            if start >= n:
                return _normalize(out)
            f = f0 * (1.0 + rng.uniform(-0.003, 0.003))
            beep = _partials(sr, t, f, amps) * _ramp_gate(beep_n, sr)
            m = min(beep_n, n - start)
            out[start : start + m] = beep[:m]
        cycle += 1


def siren(sr: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """An emergency-vehicle siren (unlabelled distractor): wail or yelp sweep between ~600 and ~1500 Hz with harmonics."""
    n = int(round(duration_s * sr))
    t = np.arange(n) / sr
    lo = rng.uniform(550.0, 700.0)
    hi = rng.uniform(1300.0, 1550.0)
    period = rng.uniform(3.0, 6.0) if rng.random() < 0.5 else rng.uniform(0.25, 0.4)  # wail / yelp
    phase0 = rng.uniform(0, 1)
    # Triangle-ish sweep (rising faster than falling sounds more like a mechanical siren).
    s = (t / period + phase0) % 1.0
    shape = np.where(s < 0.4, s / 0.4, 1.0 - (s - 0.4) / 0.6)
    f = lo + (hi - lo) * (0.5 - 0.5 * np.cos(np.pi * shape))
    phase = 2 * np.pi * np.cumsum(f) / sr
    amps = (1.0, rng.uniform(0.3, 0.6), rng.uniform(0.1, 0.3), rng.uniform(0.05, 0.15))
    out = np.zeros(n)
    for k, a in enumerate(amps, start=1):
        # Per-sample harmonic mask: harmonics above 0.45*sr are dropped (no aliasing).
        out += a * np.sin(k * phase) * (k * f < 0.45 * sr)
    return _normalize(out * _ramp_gate(n, sr, 0.05))


# -- impulsive events ----------------------------------------------------------------


def gunshot(sr: int, rng: np.random.Generator) -> np.ndarray:
    """A gunshot: sharp broadband crack (fast attack), low boom, 50-300 ms exponential decay, optional echo.

    Length varies with the drawn decay and echo (about 0.3-1.5 s); the tail is trimmed at -60 dB.
    """
    tau = rng.uniform(0.05, 0.3) / 3.0  # decay constant whose -26 dB point lies in 50-300 ms
    body_s = 7.0 * tau + 0.05
    n = int(round(body_s * sr))
    t = np.arange(n) / sr
    attack = 1.0 - np.exp(-t / rng.uniform(0.0002, 0.0008))
    # Broadband blast: white noise, slightly high-passed, decaying exponentially.
    blast = _band(rng.standard_normal(n), sr, rng.uniform(200.0, 600.0), None, order=2)
    blast *= attack * np.exp(-t / tau)
    # Muzzle crack: a few-sample N-wave at the very start.
    crack_n = max(2, int(0.0008 * sr))
    crack = np.zeros(n)
    crack[:crack_n] = np.linspace(1.0, -1.0, crack_n) * rng.uniform(1.5, 3.0)
    # Boom: a low, downward-gliding thump plus low-passed noise, decaying a bit slower.
    f_boom = rng.uniform(50.0, 110.0)
    tau_boom = tau * rng.uniform(1.2, 2.0)
    boom_phase = 2 * np.pi * np.cumsum(f_boom * (1.0 + 0.5 * np.exp(-t / 0.02))) / sr
    boom = np.sin(boom_phase) + 0.5 * _band(rng.standard_normal(n), sr, None, 250.0, order=2) * 4.0
    boom *= attack * np.exp(-t / tau_boom) * rng.uniform(0.6, 1.2)
    x = blast / (np.max(np.abs(blast)) + 1e-12) + crack + boom
    if rng.random() < 0.6:
        # Echo tail: delayed, duller and weaker copies (walls, buildings).
        delay = rng.uniform(0.05, 0.35)
        d = int(round(delay * sr))
        n_echo = rng.integers(1, 4)
        tail = np.zeros(n + d * int(n_echo))
        tail[:n] = x
        dull = _band(x, sr, None, rng.uniform(1500.0, 4000.0), order=2)
        for k in range(1, int(n_echo) + 1):
            tail[k * d : k * d + n] += dull * (rng.uniform(0.15, 0.4) ** k)
        x = tail
    return _normalize(_trim_tail(x, sr))


def glass_break(sr: int, rng: np.random.Generator) -> np.ndarray:
    """Breaking glass: a crack transient, then many short 2-10 kHz ringing partials and shard clicks over ~0.3-1 s."""
    length_s = rng.uniform(0.3, 1.0)
    n = int(round((length_s + 0.3) * sr))
    t = np.arange(n) / sr
    out = np.zeros(n)
    # Initial crack: a short broadband burst with very fast decay.
    crack_n = int(0.03 * sr)
    crack = _band(rng.standard_normal(crack_n), sr, 1000.0, None, order=2)
    crack *= np.exp(-np.arange(crack_n) / (rng.uniform(0.002, 0.006) * sr))
    out[:crack_n] += 2.5 * crack / (np.max(np.abs(crack)) + 1e-12)
    # Ringing partials: random onsets biased towards the start, each decaying quickly.
    f_hi = min(10000.0, 0.45 * sr)
    n_partials = int(rng.integers(25, 70))
    for _ in range(n_partials):
        onset = min(length_s, rng.exponential(length_s / 3.0))
        f = rng.uniform(2000.0, f_hi)
        tau = rng.uniform(0.01, 0.12)
        i0 = int(onset * sr)
        m = min(n - i0, int(6 * tau * sr))
        tt = t[:m]
        out[i0 : i0 + m] += (
            rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * f * tt + rng.uniform(0, 2 * np.pi)) * np.exp(-tt / tau)
        )
    # Shards hitting the floor: tiny high-passed clicks spread over the event.
    n_clicks = int(rng.integers(5, 25))
    click_n = int(0.004 * sr)
    for _ in range(n_clicks):
        i0 = int(rng.uniform(0.02, length_s) * sr)
        m = min(click_n, n - i0)
        c = rng.standard_normal(m) * np.exp(-np.arange(m) / (0.0008 * sr))
        out[i0 : i0 + m] += rng.uniform(0.3, 1.0) * c
    out = _band(out, sr, 1500.0, None, order=2)
    return _normalize(_trim_tail(out, sr))


# -- background ----------------------------------------------------------------------


def _pink(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS pink (1/f power) noise by spectral shaping."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spec.shape[0], dtype=np.float64)
    f[0] = 1.0
    spec /= np.sqrt(f)
    spec[0] = 0.0
    x = np.fft.irfft(spec, n)
    return x / (np.std(x) + 1e-12)


def _brown(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-RMS brown (1/f^2 power) noise: leaky-integrated white noise."""
    x = lfilter([1.0], [1.0, -0.995], rng.standard_normal(n))
    x -= np.mean(x)
    return x / (np.std(x) + 1e-12)


def _clutter(sr: int, rng: np.random.Generator) -> np.ndarray:
    """One soft everyday sound: a thud, a click or a rustle (unit peak)."""
    kind = rng.integers(0, 3)
    if kind == 0:  # thud: something put down on a table
        n = int(rng.uniform(0.08, 0.25) * sr)
        t = np.arange(n) / sr
        x = np.sin(2 * np.pi * rng.uniform(70.0, 200.0) * t) + 0.3 * _band(rng.standard_normal(n), sr, None, 600.0)
        x *= np.exp(-t / rng.uniform(0.02, 0.06))
    elif kind == 1:  # click: a switch, a door latch
        n = int(rng.uniform(0.003, 0.015) * sr)
        x = _band(rng.standard_normal(n), sr, 500.0, 5000.0, order=2) * np.exp(-np.arange(n) / (0.002 * sr))
    else:  # rustle: clothes, paper
        n = int(rng.uniform(0.2, 0.8) * sr)
        x = _band(rng.standard_normal(n), sr, rng.uniform(300.0, 1500.0), rng.uniform(3000.0, 7000.0), order=2)
        x *= np.hanning(n)
    return x / (np.max(np.abs(x)) + 1e-12)


def background(sr: int, duration_s: float, rng: np.random.Generator) -> np.ndarray:
    """Room tone: pink + brown noise, 50/60 Hz mains hum with harmonics, and occasional soft clutter.

    Returned at an RMS of about -40 dBFS (+-6 dB), peak <= 1.
    """
    n = int(round(duration_s * sr))
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    t = np.arange(n) / sr
    w_pink = rng.uniform(0.4, 1.0)
    x = w_pink * _pink(n, rng) + (1.0 - w_pink) * _brown(n, rng)
    mains = 50.0 if rng.random() < 0.5 else 60.0
    hum_level = rng.uniform(0.05, 0.3)
    for k, a in ((1, 1.0), (2, 0.5), (3, 0.3), (5, 0.1)):
        x += hum_level * a * np.sin(2 * np.pi * k * mains * t + rng.uniform(0, 2 * np.pi))
    x /= np.std(x) + 1e-12
    # Clutter: a Poisson process (about one every 5 s), each a few dB around the noise level.
    n_clutter = rng.poisson(duration_s / 5.0)
    for _ in range(int(n_clutter)):
        c = _clutter(sr, rng) * rng.uniform(1.0, 4.0)
        i0 = int(rng.uniform(0, max(1, n - c.shape[0])))
        m = min(c.shape[0], n - i0)
        x[i0 : i0 + m] += c[:m]
    rms = 10 ** ((-40.0 + rng.uniform(-6.0, 6.0)) / 20)
    x *= rms
    peak = float(np.max(np.abs(x)))
    if peak > 1.0:
        x /= peak
    return x.astype(np.float32)


# -- scenes --------------------------------------------------------------------------


def _active_rms(x: np.ndarray, sr: int) -> float:
    """RMS over the 10 ms frames within 20 dB of the loudest one (the audible part of an event)."""
    hop = max(1, int(0.01 * sr))
    m = x.shape[0] // hop
    if m == 0:
        return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if x.size else 0.0
    e = np.mean(x[: m * hop].astype(np.float64).reshape(m, hop) ** 2, axis=1)
    active = e[e >= e.max() / 100.0]
    return float(np.sqrt(np.mean(active)))


def _event(label: str, sr: int, rng: np.random.Generator) -> np.ndarray:
    """One labelled event clip, trimmed so that its annotation is the whole clip."""
    if label == "alarm":
        # One or two T3 cycles, ending with the last beep (the trailing pause is silence).
        cycles = int(rng.integers(1, 3))
        return t3_alarm(sr, cycles * T3_CYCLE_S - T3_PAUSE_S, rng)
    if label == "gunshot":
        return gunshot(sr, rng)
    if label == "glass_break":
        return glass_break(sr, rng)
    raise ValueError(f"unknown label {label!r}")


def scene(
    sr: int = 16000, duration_s: float = 60.0, seed: int = 0
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """A background recording with alarms, gunshots and glass breaks at known, non-overlapping times.

    Events are 1.5-4 s apart, each kind appearing in turn (shuffled per round), at an
    event-to-background ratio drawn from 0 to +15 dB (event RMS over its audible
    part vs background RMS). Returns float32 audio (peak <= 1) and the annotations
    `[(onset_s, offset_s, label), ...]` sorted by onset; an event never runs past the
    end. Deterministic for a given (sr, duration_s, seed).
    """
    rng = np.random.default_rng(seed)
    audio = background(sr, duration_s, rng).astype(np.float64)
    bg_rms = float(np.sqrt(np.mean(audio**2))) if audio.size else 0.0
    n = audio.shape[0]
    annotations: list[tuple[float, float, str]] = []
    t = rng.uniform(0.5, 2.0)
    order: list[str] = []
    while True:
        if not order:
            order = list(rng.permutation(LABELS))
        label = str(order.pop())
        clip = _event(label, sr, rng).astype(np.float64)
        i0 = int(round(t * sr))
        if i0 + clip.shape[0] > n:
            break
        ebr_db = rng.uniform(0.0, 15.0)
        clip *= bg_rms * 10 ** (ebr_db / 20) / (_active_rms(clip, sr) + 1e-12)
        audio[i0 : i0 + clip.shape[0]] += clip
        annotations.append((i0 / sr, (i0 + clip.shape[0]) / sr, label))
        t = (i0 + clip.shape[0]) / sr + rng.uniform(1.5, 4.0)
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak > 0.99:
        audio *= 0.99 / peak
    return audio.astype(np.float32), annotations
