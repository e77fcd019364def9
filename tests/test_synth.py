"""synth: determinism, ranges and the acoustic traits each generated sound must have."""

from __future__ import annotations

import numpy as np
import pytest

from earshot import synth

pytestmark = pytest.mark.timeout(60)

SR = 16000


def band_energy(x: np.ndarray, sr: int, lo: float, hi: float) -> float:
    """Fraction of x's energy between lo and hi Hz."""
    spec = np.abs(np.fft.rfft(x.astype(np.float64))) ** 2
    f = np.fft.rfftfreq(x.shape[0], 1 / sr)
    return float(spec[(f >= lo) & (f < hi)].sum() / (spec.sum() + 1e-30))


def frame_rms(x: np.ndarray, sr: int, hop_s: float = 0.01) -> np.ndarray:
    """RMS per hop."""
    hop = int(hop_s * sr)
    m = x.shape[0] // hop
    return np.sqrt(np.mean(x[: m * hop].astype(np.float64).reshape(m, hop) ** 2, axis=1))


def check_audio(x: np.ndarray) -> None:
    """The common output contract: float32 mono, finite, peak <= 1, not silent."""
    assert x.dtype == np.float32 and x.ndim == 1
    assert np.isfinite(x).all()
    assert 0 < np.max(np.abs(x)) <= 1.0


@pytest.mark.parametrize("sr", [8000, 16000, 48000])
def test_generators_meet_output_contract(sr: int) -> None:
    """Every generator returns finite float32 mono with 0 < peak <= 1 at common rates."""
    rng = np.random.default_rng(0)
    for x in (
        synth.t3_alarm(sr, 4.0, rng),
        synth.siren(sr, 2.0, rng),
        synth.gunshot(sr, rng),
        synth.glass_break(sr, rng),
        synth.background(sr, 2.0, rng),
    ):
        check_audio(x)
    assert synth.t3_alarm(sr, 4.0, rng).shape[0] == 4 * sr


def test_t3_alarm_pattern_and_pitch() -> None:
    """A T3 alarm is ~3.1 kHz (+-5 %) and follows beep-gap-beep-gap-beep-pause (0.5 s units, 4 s cycle)."""
    for seed in range(3):
        x = synth.t3_alarm(SR, 8.0, np.random.default_rng(seed))
        spec = np.abs(np.fft.rfft(x))
        peak_hz = np.fft.rfftfreq(x.shape[0], 1 / SR)[np.argmax(spec)]
        assert 2945 <= peak_hz <= 3255
        on = frame_rms(x, SR, 0.25) > 0.1  # quarter-second frames: 16 per cycle
        expected = np.array([1, 1, 0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0] * 2, dtype=bool)
        np.testing.assert_array_equal(on, expected)


def test_siren_sweeps_between_600_and_1500_hz() -> None:
    """The siren's dominant frequency moves through the 550-1550 Hz range over time."""
    x = synth.siren(SR, 8.0, np.random.default_rng(3))
    n = 1024
    peaks = []
    for i in range(0, x.shape[0] - n, n):
        spec = np.abs(np.fft.rfft(x[i : i + n] * np.hanning(n)))
        peaks.append(np.fft.rfftfreq(n, 1 / SR)[np.argmax(spec)])
    peaks_arr = np.array(peaks[2:-2])
    assert peaks_arr.min() >= 500 and peaks_arr.max() <= 1600
    assert peaks_arr.max() - peaks_arr.min() > 400


def test_gunshot_is_impulsive_and_decays() -> None:
    """A gunshot peaks within 20 ms, is broadband with a low boom, falls at least 12 dB within 450 ms,
    any echo stays 6 dB under the shot, and the clip ends 20 dB down."""
    for seed in range(8):
        x = synth.gunshot(SR, np.random.default_rng(seed))
        assert int(np.argmax(frame_rms(x, SR, 0.005))) <= 3
        db = 20 * np.log10(frame_rms(x, SR, 0.05) / frame_rms(x, SR, 0.05).max() + 1e-12)
        assert int(np.argmax(db)) == 0
        assert db[2:].max(initial=-99) < -6
        assert db[1:9].min() < -12
        assert db[-1] < -20
        assert band_energy(x[: int(0.1 * SR)], SR, 2000, 8000) > 0.02
        assert band_energy(x, SR, 20, 300) > 0.02
        assert x.shape[0] / SR < 2.0


def test_glass_break_is_high_frequency_and_short() -> None:
    """Breaking glass keeps most energy in 2-8 kHz and lasts about 0.3-1.3 s."""
    for seed in range(5):
        x = synth.glass_break(SR, np.random.default_rng(seed))
        assert band_energy(x, SR, 2000, 8000) > 0.7
        assert 0.2 <= x.shape[0] / SR <= 1.4


def test_background_is_quiet_noise_with_hum() -> None:
    """Background sits around -40 dBFS and has a mains-hum line at 50 or 60 Hz."""
    x = synth.background(SR, 10.0, np.random.default_rng(1))
    level = 20 * np.log10(np.sqrt(np.mean(x.astype(np.float64) ** 2)))
    assert -47 <= level <= -33
    spec = np.abs(np.fft.rfft(x.astype(np.float64)))
    f = np.fft.rfftfreq(x.shape[0], 1 / SR)
    hum = max(spec[np.argmin(np.abs(f - 50))], spec[np.argmin(np.abs(f - 60))])
    assert hum > 5 * np.median(spec[(f > 30) & (f < 80)])


def test_scene_is_deterministic_and_annotated() -> None:
    """Same seed -> identical audio and annotations; different seed -> different audio."""
    a, ann_a = synth.scene(SR, 30.0, seed=7)
    b, ann_b = synth.scene(SR, 30.0, seed=7)
    c, _ = synth.scene(SR, 30.0, seed=8)
    np.testing.assert_array_equal(a, b)
    assert ann_a == ann_b
    assert not np.array_equal(a, c)
    check_audio(a)
    assert a.shape[0] == 30 * SR


def test_scene_events_are_placed_where_annotated() -> None:
    """Annotations are sorted, non-overlapping, inside the clip, cover all labels, and the audio is
    louder inside each annotated event than in the background just before it."""
    audio, ann = synth.scene(SR, 60.0, seed=0)
    assert {label for _, _, label in ann} == set(synth.LABELS)
    prev_end = 0.0
    for onset, offset, label in ann:
        assert label in synth.LABELS
        assert prev_end < onset < offset <= 60.0
        prev_end = offset
        i0, i1 = int(onset * SR), int(offset * SR)
        inside = frame_rms(audio[i0:i1], SR).max()
        before = frame_rms(audio[max(0, i0 - SR) : i0], SR)
        assert inside > 1.5 * np.median(before), (onset, label)


def test_scene_event_to_background_ratio_range() -> None:
    """Over several scenes the events' loudness above background spans roughly 0..+15 dB (never far outside)."""
    ratios = []
    for seed in range(4):
        audio, ann = synth.scene(SR, 40.0, seed=seed)
        for onset, offset, _ in ann:
            i0, i1 = int(onset * SR), int(offset * SR)
            before = audio[max(0, i0 - SR // 2) : i0].astype(np.float64)
            bg = np.sqrt(np.mean(before**2))
            ev = frame_rms(audio[i0:i1], SR)
            active = ev[ev**2 >= (ev**2).max() / 100]
            ratios.append(20 * np.log10(np.sqrt(np.mean(active**2)) / bg))
    assert min(ratios) > -4 and max(ratios) < 22
    assert max(ratios) - min(ratios) > 6
