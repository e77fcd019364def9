"""Strongly labelled training windows by mixing events into backgrounds, with augmentation.

Each call of `Mixer.examples(rng)` builds one mixture of a few seconds: a negative background,
optionally one or two positive events and a hard-negative "distractor" event placed at random
offsets and event-to-background ratios, then whole-mixture augmentation (gain, channel filter).
The mixture goes through the daemon's own frontend (`earshot.features.features`), so the running
level has a few seconds of history as it would live, and several windows of `chunk_frames` frames
are cut from its end region. Each window gets a per-class target and a per-class loss mask:

- positive when the event's active part overlaps the window by at least `min_overlap_s` (or half
  of a shorter event): the detector's onset estimate assumes the model fires about one hop after the
  sound enters the window, and its offset estimate that the score drops once the sound has left;
- negative when nothing of the class is in the window, or only a sliver (< `sliver_s`) of a sound
  that is leaving it (this teaches clean offsets);
- ignored (mask 0) for the ambiguous rest: a sliver that has only just entered, or a small remnant.

Where the event sits in a weakly labelled clip comes from `data.activity_mask` (energy envelope).
"""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.signal import butter, fftconvolve, sosfilt

from earshot.features import FrontendParams, features

try:  # run as `python tools/x.py` (tools/ on sys.path) or imported as `tools.augment`
    from data import ACTIVITY_HOP, EVENT_LABELS, NEGATIVE, Clip, activity_mask, activity_params
except ImportError:  # pragma: no cover - import path depends on the entry point
    from tools.data import ACTIVITY_HOP, EVENT_LABELS, NEGATIVE, Clip, activity_mask, activity_params

Example = tuple[np.ndarray, np.ndarray, np.ndarray]
"""(features (T, n_mels) float32, targets (W, C) float32 in {0,1}, loss masks (W, C) float32).

The features hold W windows of `chunk_frames` frames ending every `WINDOW_HOP` frames, the last at T
(T = chunk_frames + (W - 1) * WINDOW_HOP): one window (W = 1) from `Mixer.examples`, a whole segment
of overlapping windows from `Mixer.segments`, whose windows share the network's per-frame work in
training as they do live.
"""

WINDOW_HOP = 10
"""Frames between the ends of consecutive windows of a segment: the daemon's default hop (0.1 s)."""


@dataclass(frozen=True)
class MixConfig:
    """How mixtures are drawn. Probabilities are per mixture unless stated."""

    history_s: tuple[float, float] = (2.0, 3.0)
    """Audio before the first window (s): gives the running level realistic history."""
    windows: int = 4
    """Windows cut from each mixture by `examples` (their ends spread over the last `span_s`)."""
    segment_windows: int = 16
    """Windows of a `segments` example, every WINDOW_HOP frames: (16 - 1) * 10 frames = span_s."""
    span_s: float = 1.5
    """The windows end at random times within the last `span_s` seconds of the mixture."""
    p_no_event: float = 0.35
    """Mixtures with no positive event at all (pure negatives)."""
    p_second_event: float = 0.1
    """Mixtures with a second positive event of another class."""
    p_distractor: float = 0.6
    """Mixtures with a hard-negative foreground event (door slam, clap, speech, ...)."""
    p_long_history: float = 0.1
    """Pure-negative mixtures with a long history (`long_history_s`), as a stream that has run for a while."""
    long_history_s: float = 8.0
    """History of those long mixtures (s)."""
    ebr_db: tuple[float, float] = (-10.0, 15.0)
    """Event-to-background ratio range (dB), event RMS over its active part vs background RMS there."""
    distractor_ebr_db: tuple[float, float] = (-5.0, 20.0)
    """EBR range of distractors (dB): hard negatives are often loud and close."""
    level_dbfs: tuple[float, float] = (-55.0, -12.0)
    """RMS level of the whole mixture (dBFS): loudness must not be a cue."""
    p_speed: float = 0.5
    """Events resampled by a factor in `speed` (speed and pitch change together)."""
    speed: tuple[float, float] = (0.95, 1.05)
    """Resampling factor range."""
    p_reverb: float = 0.3
    """Events convolved with a synthetic exponential-decay room impulse response."""
    rt60_s: tuple[float, float] = (0.15, 0.9)
    """Reverberation time range (s)."""
    p_channel: float = 0.3
    """Whole mixtures band-limited or filtered (microphone / channel variety), negatives included."""
    p_onset_window: float = 0.5
    """Mixtures with a positive event whose first window ends 50-400 ms after its onset: the windows
    that decide detection latency and onset accuracy, rare under uniform placement."""
    p_offset_window: float = 0.3
    """Mixtures with a positive event whose second window starts around the event's end (clean offsets)."""
    p_opus: float = 0.5
    """Real event clips round-tripped through Ogg Opus (about 32 kbit/s): the negatives are stored as Opus
    and most positives as FLAC, so without this the codec would be a label cue."""
    p_spec_augment: float = 0.5
    """Windows with one time mask and one frequency mask."""
    max_time_mask: int = 8
    """Widest time mask (frames); short, so a gunshot is never masked away entirely."""
    max_freq_mask: int = 8
    """Widest frequency mask (mel bands)."""
    min_overlap_s: float = 0.1
    """A window is positive for an event overlapping it by this much active sound (s) ..."""
    min_overlap_frac: float = 0.5
    """... or by this fraction of a shorter event's active sound."""
    sliver_s: float = 0.05
    """A leaving event with at most this much active sound left in the window is a negative (s)."""


# ---------------------------------------------------------------------------
# Signal-level augmentations


def speed_change(x: np.ndarray, factor: float) -> np.ndarray:
    """Resample by `factor` (> 1 = faster and higher) with linear interpolation (fine for +-5 %)."""
    n_out = max(1, int(round(len(x) / factor)))
    pos = np.arange(n_out) * factor
    return np.interp(pos, np.arange(len(x)), x).astype(np.float32)


OPUS_BITRATE = 30000
"""Bits per second of the Opus round trip: the rate of the data set's Opus files (about 30 kbit/s)."""
OPUS_COMPLEXITY = 2
"""Encoder complexity 0-10: 2 encodes ~15x faster than the default 10 with the same band limits and
quantisation artefacts at this bitrate (soundfile's Ogg Opus writer, fixed at 10, costs ~0.2 s of CPU per
second of audio, more than making the rest of a training mixture)."""


class _Libopus:
    """libopus through ctypes (the system's libopus0): encode + decode 20 ms frames in memory."""

    def __init__(self) -> None:
        import ctypes
        import ctypes.util

        self.ct = ctypes
        name = ctypes.util.find_library("opus") or "libopus.so.0"
        self.lib = ctypes.CDLL(name)
        self.lib.opus_encoder_create.restype = ctypes.c_void_p
        self.lib.opus_decoder_create.restype = ctypes.c_void_p
        self.lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
        self.lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]

    def round_trip(self, x: np.ndarray, sr: int) -> np.ndarray:
        ct, lib = self.ct, self.lib
        err = ct.c_int()
        enc = ct.c_void_p(lib.opus_encoder_create(sr, 1, 2049, ct.byref(err)))  # OPUS_APPLICATION_AUDIO
        if err.value != 0:
            raise OSError(f"opus_encoder_create failed ({err.value})")
        dec = ct.c_void_p(lib.opus_decoder_create(sr, 1, ct.byref(err)))
        try:
            lib.opus_encoder_ctl(enc, 4002, ct.c_int(OPUS_BITRATE))  # OPUS_SET_BITRATE
            lib.opus_encoder_ctl(enc, 4010, ct.c_int(OPUS_COMPLEXITY))  # OPUS_SET_COMPLEXITY
            delay = ct.c_int()
            lib.opus_encoder_ctl(enc, 4027, ct.byref(delay))  # OPUS_GET_LOOKAHEAD
            frame = sr // 50
            n_frames = -(-(len(x) + delay.value) // frame)
            src = np.zeros(n_frames * frame, dtype=np.float32)
            src[: len(x)] = x
            out = np.zeros_like(src)
            packet = (ct.c_ubyte * 1500)()
            fptr = ct.POINTER(ct.c_float)
            for k in range(n_frames):
                a = src[k * frame:(k + 1) * frame]
                n = lib.opus_encode_float(enc, a.ctypes.data_as(fptr), frame, packet, 1500)
                if n < 0:
                    raise OSError(f"opus_encode_float failed ({n})")
                b = out[k * frame:(k + 1) * frame]
                lib.opus_decode_float(dec, packet, n, b.ctypes.data_as(fptr), frame, 0)
            return out[delay.value: delay.value + len(x)]
        finally:
            lib.opus_encoder_destroy(enc)
            lib.opus_decoder_destroy(dec)


@functools.cache
def _libopus() -> _Libopus | None:
    """The system's libopus, loaded once; None where it is missing."""
    try:
        return _Libopus()
    except OSError:
        return None


def opus_round_trip(x: np.ndarray, sr: int) -> np.ndarray:
    """Encode to Opus at ~30 kbit/s and decode again, in memory (the codec's artefacts, same length and rate).

    Uses libopus directly where the system has it (fast, see OPUS_COMPLEXITY), else soundfile's Ogg Opus.
    """
    x = np.clip(np.asarray(x, dtype=np.float32), -1.0, 1.0)
    lib = _libopus()
    if lib is not None:
        return lib.round_trip(x, sr)
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, x, sr, format="OGG", subtype="OPUS")
    buf.seek(0)
    y, _ = sf.read(buf, dtype="float32")
    y = y[: len(x)]
    return np.pad(y, (0, len(x) - len(y))) if len(y) < len(x) else y


def synthetic_rir(rng: np.random.Generator, sr: int, rt60_s: float) -> np.ndarray:
    """A room impulse response: direct path plus exponentially decaying noise (60 dB down at rt60_s)."""
    n = max(2, int(rt60_s * sr))
    t = np.arange(n) / sr
    tail = rng.standard_normal(n) * np.exp(-6.9078 * t / rt60_s)
    tail[: int(0.002 * sr)] = 0.0  # first reflections arrive a couple of ms after the direct sound
    drr_db = rng.uniform(-3.0, 12.0)  # direct-to-reverberant energy ratio
    tail *= 10 ** (-drr_db / 20) / (np.sqrt(np.sum(tail**2)) + 1e-12)
    tail[0] = 1.0
    return tail.astype(np.float32)


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """Convolve with an impulse response, keeping the tail (output is longer by len(rir) - 1)."""
    return fftconvolve(x, rir).astype(np.float32)


def channel_filter(x: np.ndarray, rng: np.random.Generator, sr: int) -> np.ndarray:
    """A random microphone/channel: band-limit (as an 8 kHz recorder), telephone band, high-pass or tilt."""
    nyq = sr / 2
    kind = rng.integers(0, 4)
    if kind == 0:  # low-pass: the band-limited 8 kHz recorders, cheap microphones, codecs
        cutoff = 3800.0 if rng.random() < 0.5 else rng.uniform(2500.0, 7000.0)
        sos = butter(int(rng.integers(4, 9)), cutoff / nyq, btype="lowpass", output="sos")
    elif kind == 1:  # telephone-like band-pass
        sos = butter(4, [rng.uniform(200.0, 400.0) / nyq, rng.uniform(3000.0, 4000.0) / nyq], btype="bandpass", output="sos")
    elif kind == 2:  # high-pass: small speakers and MEMS microphones lose the bass
        sos = butter(2, rng.uniform(100.0, 600.0) / nyq, btype="highpass", output="sos")
    else:  # gentle tilt: mix with a low-passed copy
        sos = butter(1, rng.uniform(1000.0, 4000.0) / nyq, btype="lowpass", output="sos")
        w = rng.uniform(0.3, 0.8)
        return ((1 - w) * x + w * sosfilt(sos, x)).astype(np.float32)
    return sosfilt(sos, x).astype(np.float32)


def spec_augment(win: np.ndarray, rng: np.random.Generator, max_time: int, max_freq: int) -> np.ndarray:
    """One time mask and one frequency mask on a (T, n_mels) window, filled with the window's mean."""
    out = win.copy()
    fill = float(out.mean())
    t_w = int(rng.integers(0, max_time + 1))
    if t_w:
        t0 = int(rng.integers(0, out.shape[0] - t_w + 1))
        out[t0 : t0 + t_w] = fill
    f_w = int(rng.integers(0, max_freq + 1))
    if f_w:
        f0 = int(rng.integers(0, out.shape[1] - f_w + 1))
        out[:, f0 : f0 + f_w] = fill
    return out


def active_rms(x: np.ndarray, mask: np.ndarray, hop: int = ACTIVITY_HOP) -> float:
    """RMS of `x` over the hops where `mask` is set (the audible part of an event)."""
    n = min(len(mask), len(x) // hop)
    if n == 0:
        return float(np.sqrt(np.mean(x.astype(np.float64) ** 2) + 1e-20))
    e = np.mean(x[: n * hop].astype(np.float64).reshape(n, hop) ** 2, axis=1)
    sel = e[mask[:n]]
    return float(np.sqrt((sel.mean() if sel.size else e.mean()) + 1e-20))


# ---------------------------------------------------------------------------
# Extra synthetic alarms (alarm clocks, T4 CO alarms, buzzers): not in the recordings


def beep_alarm(sr: int, rng: np.random.Generator) -> np.ndarray:
    """An alarm-clock / T4 / buzzer beep pattern, 1.5-4 s, peak 0.9.

    Patterns: T4 (four 0.1 s beeps, 0.1 s apart), alarm-clock bursts (2-4 fast beeps then a pause),
    or a steady on/off beep; tone 1-4.5 kHz, sine or square-ish (buzzer), with harmonics.
    """
    dur = rng.uniform(1.5, 4.0)
    n = int(dur * sr)
    t = np.arange(n) / sr
    f0 = rng.uniform(1000.0, 4500.0) if rng.random() < 0.8 else rng.uniform(400.0, 1000.0)
    kind = rng.integers(0, 3)
    if kind == 0:  # T4: 4 x (0.1 on, 0.1 off), then ~1 s pause
        on, off, burst, pause = 0.1, 0.1, 4, rng.uniform(0.6, 1.2)
    elif kind == 1:  # alarm clock
        on, off, burst, pause = rng.uniform(0.05, 0.12), rng.uniform(0.04, 0.1), int(rng.integers(2, 5)), rng.uniform(0.3, 0.7)
    else:  # steady beeping
        on, off, burst, pause = rng.uniform(0.15, 0.5), rng.uniform(0.1, 0.5), 1, 0.0
    period = burst * (on + off) + pause
    phase_t = t % period
    in_burst = phase_t < burst * (on + off)
    gate = in_burst & ((phase_t % (on + off)) < on)
    # Smooth the gate (3 ms) so beeps do not click.
    k = max(1, int(0.003 * sr))
    env = np.convolve(gate.astype(np.float64), np.ones(k) / k, mode="same")
    tone = np.sin(2 * np.pi * f0 * t)
    if rng.random() < 0.4:  # buzzer: odd harmonics
        for h in (3, 5, 7):
            if h * f0 < 0.45 * sr:
                tone += np.sin(2 * np.pi * h * f0 * t) / h
    else:
        if 2 * f0 < 0.45 * sr:
            tone += rng.uniform(0.0, 0.3) * np.sin(2 * np.pi * 2 * f0 * t)
    x = tone * env
    return (0.9 * x / (np.max(np.abs(x)) + 1e-12)).astype(np.float32)


# ---------------------------------------------------------------------------
# Pools: where events and backgrounds come from

EventDraw = Callable[[np.random.Generator], np.ndarray]
BackgroundDraw = Callable[[np.random.Generator, int], np.ndarray]

# Negative kinds that are easily mistaken for a target class; drawn more often as distractors.
HARD_NEGATIVE_WORDS = (
    "door", "slam", "knock", "clap", "firework", "explosion", "thunder", "keys", "dish", "typing", "keyboard",
    "music", "speech", "word", "doorbell", "dog", "impact", "bang", "drawer", "can_opening", "car_horn",
    "phone", "church", "clock", "scream", "jackhammer", "drilling", "mouse", "footsteps", "laugh", "cough",
    "chair", "water_drops", "pageturn", "crying", "children", "engine", "siren", "horn", "bird",
)


def is_hard_negative(kind: str) -> bool:
    """Whether a negative kind is an event-like sound easily confused with the targets."""
    k = kind.lower()
    return any(w in k for w in HARD_NEGATIVE_WORDS)


# Impulsive non-gunshots: what most gunshot false alarms on long negative streams turn out to be
# (issue 13: jackhammers, nail guns, hammering, explosions). Their strata are drawn this much more often.
IMPULSIVE_WORDS = (
    "jackhammer", "drill", "hammer", "nail", "slam", "door", "knock", "impact", "bang", "firework", "explosion",
    "thunder", "clap", "dish", "chop", "wood", "footsteps", "can_opening",
)
IMPULSIVE_WEIGHT = 2.0


def impulsive_weight(clip: Clip) -> float:
    """`IMPULSIVE_WEIGHT` for an impulsive negative kind, 1 for any other clip (a `StratifiedPool` weight)."""
    k = clip.kind.lower()
    return IMPULSIVE_WEIGHT if any(w in k for w in IMPULSIVE_WORDS) else 1.0


class StratifiedPool:
    """Draws clips balanced over strata (source, kind), then groups, then files.

    A stratum's weight is sqrt(number of groups) times an optional factor, so a big source counts
    more than a small one but does not drown it; within a stratum every group is equally likely, so a
    recording cut into 100 chunks counts as one.
    """

    def __init__(self, items: Sequence[tuple[Clip, np.ndarray]], weight: Callable[[Clip], float] | None = None):
        strata: dict[tuple[str, str], dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
        for i, (clip, _) in enumerate(items):
            strata[(clip.source, clip.kind)][clip.group].append(i)
        self.items = list(items)
        self.strata = [list(groups.values()) for _, groups in sorted(strata.items())]
        keys = sorted(strata)
        w = np.array(
            [
                math.sqrt(len(strata[k])) * (weight(self.items[next(iter(strata[k].values()))[0]][0]) if weight else 1.0)
                for k in keys
            ]
        )
        if len(w) == 0 or w.sum() <= 0:
            raise ValueError("empty pool")
        self.p = w / w.sum()
        self.keys = keys

    def draw_index(self, rng: np.random.Generator) -> int:
        """Index into `items` of one drawn clip."""
        groups = self.strata[int(rng.choice(len(self.strata), p=self.p))]
        files = groups[int(rng.integers(len(groups)))]
        return files[int(rng.integers(len(files)))]

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """Samples of one drawn clip (shared, do not modify)."""
        return self.items[self.draw_index(rng)][1]


def fill_background(draw: EventDraw, rng: np.random.Generator, n: int) -> np.ndarray:
    """`n` samples of unit-RMS background: a random stretch of one recording, or several joined with crossfades.

    Recordings differ hugely in level, so each piece is scaled to unit RMS (+-6 dB) before joining.
    """
    fade = 320  # 20 ms crossfade between joined recordings
    out = np.zeros(0, dtype=np.float64)
    while len(out) < n:
        x = draw(rng)
        need = n - len(out) + (fade if len(out) else 0)
        if len(x) > need:
            i0 = int(rng.integers(0, len(x) - need + 1))
            x = x[i0 : i0 + need]
        seg = x.astype(np.float64)
        seg *= 10 ** (rng.uniform(-6.0, 6.0) / 20) / (np.sqrt(np.mean(seg**2)) + 1e-8)
        if len(out) >= fade and len(seg) > 2 * fade:
            ramp = np.linspace(0.0, 1.0, fade)
            out[-fade:] = out[-fade:] * ramp[::-1] + seg[:fade] * ramp
            seg = seg[fade:]
        out = np.concatenate([out, seg])
    out = out[:n]
    return (out / (np.sqrt(np.mean(out**2)) + 1e-8)).astype(np.float32)


# ---------------------------------------------------------------------------
# The mixer


@dataclass
class _Placed:
    """An event placed in a mixture."""

    cls: int
    """Class index, or -1 for a distractor (hard negative)."""
    hop0: int
    """Mixture hop (10 ms step) where the clip starts."""
    active: np.ndarray
    """Per-hop activity of the clip (bool)."""


class Mixer:
    """Makes labelled training windows from event and background pools (see the module docstring).

    `events[label]` draws one clip of that class, `distractors` draws a hard-negative clip and
    `backgrounds` draws a negative recording. Clips are float32 mono at the frontend's rate.
    """

    def __init__(
        self,
        labels: Sequence[str],
        events: dict[str, EventDraw],
        backgrounds: EventDraw,
        distractors: EventDraw | None = None,
        frontend: FrontendParams = FrontendParams(),
        cfg: MixConfig = MixConfig(),
    ):
        self.labels = tuple(labels)
        self.events = events
        self.backgrounds = backgrounds
        self.distractors = distractors
        self.p = frontend
        self.cfg = cfg
        if frontend.hop_length != ACTIVITY_HOP:
            raise ValueError(f"frontend hop {frontend.hop_length} must equal the activity hop {ACTIVITY_HOP}")

    def _event(self, rng: np.random.Generator, clip: np.ndarray, label: str) -> tuple[np.ndarray, np.ndarray]:
        """Augment one event clip (speed, reverb); return (samples, per-hop activity)."""
        cfg, sr = self.cfg, self.p.sample_rate
        x = clip
        if len(x) > 6 * sr:  # long recordings: a random 6 s stretch is plenty for a 1 s window
            i0 = int(rng.integers(0, len(x) - 6 * sr))
            x = x[i0 : i0 + 6 * sr]
        if rng.random() < cfg.p_speed:
            x = speed_change(x, rng.uniform(*cfg.speed))
        active = activity_mask(x, activity_params(label))
        if rng.random() < cfg.p_reverb:
            x = reverberate(x, synthetic_rir(rng, sr, rng.uniform(*cfg.rt60_s)))
            active = np.concatenate([active, np.zeros(max(0, len(x) // ACTIVITY_HOP - len(active)), dtype=bool)])
        return x.astype(np.float32), active

    def mixture(self, rng: np.random.Generator) -> tuple[np.ndarray, list[_Placed], int]:
        """One mixture: (samples, placed events, hop where the window-end span starts)."""
        cfg, sr, hop = self.cfg, self.p.sample_rate, ACTIVITY_HOP
        chunk = self.p.chunk_frames
        n_pos = 0 if rng.random() < cfg.p_no_event else (2 if rng.random() < cfg.p_second_event else 1)
        hist = cfg.long_history_s if (n_pos == 0 and rng.random() < cfg.p_long_history) else rng.uniform(*cfg.history_s)
        span_hops = int(cfg.span_s * sr / hop)
        hist_hops = int(hist * sr / hop)
        # Windows end within [end0, end0 + span); they start chunk hops earlier.
        end0 = hist_hops + chunk
        total_hops = end0 + span_hops + 2
        n = total_hops * hop + self.p.win_length
        bg = fill_background(self.backgrounds, rng, n)
        mix = bg.astype(np.float64)
        placed: list[_Placed] = []
        classes = list(rng.permutation(len(self.labels))[:n_pos])
        todo = [(c, self.events[self.labels[c]], cfg.ebr_db) for c in classes]
        if self.distractors is not None and rng.random() < cfg.p_distractor:
            todo.append((-1, self.distractors, cfg.distractor_ebr_db))
        for cls, draw, ebr_range in todo:
            x, active = self._event(rng, draw(rng), self.labels[cls] if cls >= 0 else NEGATIVE)
            idx = np.flatnonzero(active)
            if idx.size == 0:
                continue
            # Where the active part starts, relative to the window-end span: anywhere from well before
            # the first window (so windows see the event's tail or its leaving) to the last window's end.
            a0, a1 = int(idx[0]), int(idx[-1]) + 1
            dur = a1 - a0
            onset_hop = int(rng.integers(end0 - chunk - min(dur, 3 * chunk), end0 + span_hops))
            hop0 = onset_hop - a0
            s0 = hop0 * hop
            lo, hi = max(0, s0), min(n, s0 + len(x))
            if hi <= lo:
                continue
            seg = x[lo - s0 : hi - s0].astype(np.float64)
            # EBR over the event's active hops that land in the mixture.
            ev_rms = active_rms(x, active)
            a_lo, a_hi = max(0, s0 + a0 * hop), min(n, s0 + a1 * hop)
            bg_part = bg[a_lo:a_hi] if a_hi - a_lo >= hop else bg
            bg_rms = float(np.sqrt(np.mean(bg_part.astype(np.float64) ** 2)) + 1e-8)
            gain = bg_rms * 10 ** (rng.uniform(*ebr_range) / 20) / (ev_rms + 1e-8)
            mix[lo:hi] += gain * seg
            placed.append(_Placed(cls, hop0, active))
        if rng.random() < cfg.p_channel:
            mix = channel_filter(mix, rng, sr).astype(np.float64)
        level = 10 ** (rng.uniform(*cfg.level_dbfs) / 20)
        mix *= level / (np.sqrt(np.mean(mix**2)) + 1e-12)
        np.clip(mix, -1.0, 1.0, out=mix)  # loud mixtures clip, as a real input would
        return mix.astype(np.float32), placed, end0

    def label_window(self, placed: list[_Placed], end: int) -> tuple[np.ndarray, np.ndarray]:
        """(target, mask) for the window of frames [end - chunk_frames, end)."""
        cfg, chunk = self.cfg, self.p.chunk_frames
        start = end - chunk
        y = np.zeros(len(self.labels), dtype=np.float32)
        m = np.ones(len(self.labels), dtype=np.float32)
        min_hops = cfg.min_overlap_s * self.p.sample_rate / ACTIVITY_HOP
        sliver = cfg.sliver_s * self.p.sample_rate / ACTIVITY_HOP
        for ev in placed:
            if ev.cls < 0:
                continue
            act = ev.active
            lo, hi = max(0, start - ev.hop0), min(len(act), end - ev.hop0)
            inside = int(act[lo:hi].sum()) if hi > lo else 0
            if inside == 0:
                continue
            total = int(act.sum())
            if inside >= min(min_hops, cfg.min_overlap_frac * total):
                y[ev.cls] = 1.0
                m[ev.cls] = 1.0
                continue
            before = int(act[: max(0, lo)].sum())  # active sound that has already left the window
            after = int(act[max(0, hi) :].sum())  # active sound still to come
            if y[ev.cls] == 0.0:
                # A sliver of a leaving sound is a clear negative; anything else is ambiguous.
                m[ev.cls] = 1.0 if (before > 0 and after == 0 and inside <= sliver) else 0.0
        return y, m

    def examples(self, rng: np.random.Generator) -> list[Example]:
        """`cfg.windows` labelled windows from one new mixture."""
        cfg, chunk = self.cfg, self.p.chunk_frames
        mix, placed, end0 = self.mixture(rng)
        feats = features(mix, self.p)  # (T, n_mels)
        span = int(cfg.span_s * self.p.sample_rate / ACTIVITY_HOP)
        ends = end0 + rng.integers(0, span + 1, size=cfg.windows)
        positives = [ev for ev in placed if ev.cls >= 0]
        if positives and cfg.windows >= 2:
            ev = positives[int(rng.integers(len(positives)))]
            idx = np.flatnonzero(ev.active)
            if rng.random() < cfg.p_onset_window:
                ends[0] = ev.hop0 + idx[0] + int(rng.integers(5, 41))
            if rng.random() < cfg.p_offset_window:
                ends[1] = ev.hop0 + idx[-1] + 1 + chunk + int(rng.integers(-15, 16))
            ends = np.clip(ends, max(chunk, end0 - chunk), feats.shape[0])
        out = []
        for e in ends:
            e = int(min(e, feats.shape[0]))
            win = feats[e - chunk : e]
            if rng.random() < cfg.p_spec_augment:
                win = spec_augment(win, rng, cfg.max_time_mask, cfg.max_freq_mask)
            y, m = self.label_window(placed, e)
            out.append((np.ascontiguousarray(win, dtype=np.float32), y[None], m[None]))
        return out

    def segments(self, rng: np.random.Generator) -> list[Example]:
        """One segment from one new mixture: `segment_windows` windows every WINDOW_HOP frames over the span.

        Every position of an event relative to the window (entering, inside, leaving) is labelled,
        and the network computes each frame once for all of them: training sees nine times as many
        labelled windows per minute as with separate windows (measured in 10-minute runs).
        """
        mix, placed, end0 = self.mixture(rng)
        return [self.segment_of(mix, placed, end0, rng)[0]]

    def segment_of(self, mix: np.ndarray, placed: list[_Placed], end0: int, rng: np.random.Generator
                   ) -> tuple[Example, np.ndarray]:
        """The segment of a mixture made by `mixture`, and the end frames of its windows (`segments`)."""
        cfg, chunk = self.cfg, self.p.chunk_frames
        feats = features(mix, self.p)
        ends = end0 + WINDOW_HOP * np.arange(cfg.segment_windows)
        if ends[-1] > feats.shape[0]:
            raise ValueError(f"span_s {cfg.span_s} is shorter than {cfg.segment_windows} windows every {WINDOW_HOP} frames")
        seg = feats[ends[0] - chunk : ends[-1]]
        if rng.random() < cfg.p_spec_augment:
            seg = spec_augment(seg, rng, cfg.max_time_mask, cfg.max_freq_mask)
        labels = [self.label_window(placed, int(e)) for e in ends]
        y = np.stack([lab[0] for lab in labels])
        m = np.stack([lab[1] for lab in labels])
        return (np.ascontiguousarray(seg, dtype=np.float32), y, m), ends


# ---------------------------------------------------------------------------
# Pools from the recordings


def real_mixer(
    items: Sequence[tuple[Clip, np.ndarray]],
    labels: Sequence[str] = EVENT_LABELS,
    frontend: FrontendParams = FrontendParams(),
    cfg: MixConfig = MixConfig(),
    synth_fraction: dict[str, float] | None = None,
) -> Mixer:
    """A Mixer over loaded training clips `(clip, samples)`, topped up with procedural alarms.

    `synth_fraction[label]` is the share of that class's events drawn from procedural synthesis
    (default: 15 % of alarms, half T3 smoke alarms and half alarm-clock/T4/buzzer beeps, which the
    recordings lack; 3 % of gunshots and glass breaks). Band-limited forest gunshots get half weight.
    """
    from earshot import synth

    sr = frontend.sample_rate
    synth_fraction = synth_fraction if synth_fraction is not None else {"alarm": 0.15, "gunshot": 0.03, "glass_break": 0.03}
    by_label: dict[str, list[tuple[Clip, np.ndarray]]] = defaultdict(list)
    for clip, x in items:
        if len(x) >= frontend.win_length:
            by_label[clip.label].append((clip, x))
    missing = [lab for lab in (*labels, NEGATIVE) if not by_label.get(lab)]
    if missing:
        raise ValueError(f"no training clips for: {', '.join(missing)}")

    def event_weight(c: Clip) -> float:
        return 0.5 if "forest" in c.kind or "8k" in c.kind else 1.0

    pools = {lab: StratifiedPool(by_label[lab], event_weight) for lab in labels}
    negatives = by_label[NEGATIVE]
    bg_pool = StratifiedPool(negatives)
    hard = [(c, x) for c, x in negatives if is_hard_negative(c.kind) and len(x) <= 6 * sr]
    dist_pool = StratifiedPool(hard or negatives, impulsive_weight)
    synth_makers: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
        "alarm": lambda r: synth.t3_alarm(sr, r.uniform(1.5, 4.0), r) if r.random() < 0.5 else beep_alarm(sr, r),
        "gunshot": lambda r: synth.gunshot(sr, r),
        "glass_break": lambda r: synth.glass_break(sr, r),
    }

    def make_draw(label: str) -> EventDraw:
        pool, frac = pools[label], synth_fraction.get(label, 0.0)
        maker = synth_makers.get(label)

        def draw(rng: np.random.Generator) -> np.ndarray:
            if maker is not None and rng.random() < frac:
                return maker(rng)
            x = pool.draw(rng)
            if rng.random() < cfg.p_opus and len(x) >= 320:
                peak = float(np.max(np.abs(x))) + 1e-9
                x = opus_round_trip(x / peak, sr) * peak  # at full scale, so the codec's noise floor sits low
            return x

        return draw

    return Mixer(
        labels,
        {lab: make_draw(lab) for lab in labels},
        bg_pool.draw,
        dist_pool.draw,
        frontend,
        cfg,
    )


def synth_mixer(labels: Sequence[str] = EVENT_LABELS, frontend: FrontendParams = FrontendParams(), cfg: MixConfig = MixConfig()) -> Mixer:
    """A Mixer over procedural sounds only (`earshot.synth`): for the tiny test model and smoke tests.

    Backgrounds are `synth.background`; sirens are unlabelled distractors, as in `synth.scene`.
    """
    from earshot import synth

    sr = frontend.sample_rate
    makers = {
        "alarm": lambda r: synth.t3_alarm(sr, r.uniform(1.5, 4.0), r),
        "gunshot": lambda r: synth.gunshot(sr, r),
        "glass_break": lambda r: synth.glass_break(sr, r),
    }
    return Mixer(
        labels,
        {lab: makers[lab] for lab in labels},
        lambda r: synth.background(sr, 6.0, r),
        lambda r: synth.siren(sr, r.uniform(1.0, 3.0), r),
        frontend,
        cfg,
    )
