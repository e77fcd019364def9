"""Tests for the streaming log-mel frontend (earshot.features)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from earshot.features import (
    FrontendParams,
    StreamingFeatures,
    features,
    frames_in,
    log_mel,
    mel_filterbank,
)

librosa = pytest.importorskip("librosa")

pytestmark = pytest.mark.timeout(60)

P = FrontendParams()


def _noise(seconds: float, seed: int = 0, std: float = 0.3) -> np.ndarray:
    """Coloured test signal: white noise plus a chirp, float32, well above the log floor."""
    rng = np.random.default_rng(seed)
    n = int(seconds * P.sample_rate)
    t = np.arange(n) / P.sample_rate
    chirp = 0.3 * np.sin(2 * np.pi * (200 * t + 600 * t**2))
    return (rng.standard_normal(n) * std + chirp).astype(np.float32)


def test_params_round_trip_and_reject_unknown_keys() -> None:
    """to_dict/from_dict round-trip exactly; an unknown key is a clear error naming it."""
    p = FrontendParams(n_mels=40, level_tau_s=2.0)
    assert FrontendParams.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="unknown frontend parameter.*n_melz"):
        FrontendParams.from_dict({**P.to_dict(), "n_melz": 40})
    with pytest.raises(ValueError, match="win_length"):
        FrontendParams(win_length=1024)
    assert P.frame_s == pytest.approx(0.01) and P.chunk_s == pytest.approx(1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        P.n_mels = 10  # type: ignore[misc]


@pytest.mark.parametrize(
    "p",
    [P, FrontendParams(n_mels=40, f_min=0.0, f_max=7600.0), FrontendParams(sample_rate=22050, n_fft=1024, f_max=11025.0)],
)
def test_filterbank_equals_librosa(p: FrontendParams) -> None:
    """mel_filterbank is librosa's Slaney-scale, Slaney-normalised filterbank."""
    ref = librosa.filters.mel(
        sr=p.sample_rate, n_fft=p.n_fft, n_mels=p.n_mels, fmin=p.f_min, fmax=p.f_max, htk=False, norm="slaney"
    )
    fb = mel_filterbank(p)
    assert fb.shape == (p.n_mels, p.n_fft // 2 + 1)
    np.testing.assert_allclose(fb, ref, rtol=1e-5, atol=1e-8)
    assert mel_filterbank(p) is fb  # cached


def test_log_mel_equals_librosa() -> None:
    """log_mel equals librosa's uncentred melspectrogram then log(x + floor).

    librosa frames n_fft samples and centres the 400-sample window inside them, so its
    frame i covers samples [i*hop + 56, i*hop + 456): compare against our frames of x[56:].
    """
    x = _noise(2.0)
    mel = librosa.feature.melspectrogram(
        y=x.astype(np.float64), sr=P.sample_rate, n_fft=P.n_fft, win_length=P.win_length, hop_length=P.hop_length,
        window="hann", center=False, power=2.0, n_mels=P.n_mels, fmin=P.f_min, fmax=P.f_max, htk=False, norm="slaney",
    )  # fmt: skip
    ref = np.log(mel.T + P.log_floor)
    offset = (P.n_fft - P.win_length) // 2
    ours = log_mel(x[offset:], P)
    assert ours.dtype == np.float32 and ours.shape[1] == P.n_mels
    assert abs(len(ours) - len(ref)) <= 1
    n = min(len(ours), len(ref))
    np.testing.assert_allclose(ours[:n], ref[:n], atol=2e-5, rtol=0)


@pytest.mark.parametrize("n", [0, 1, 399, 400, 559, 560, 16000])
def test_frame_count(n: int) -> None:
    """T = 1 + (N - win)//hop frames, 0 when shorter than a window; same for all entry points."""
    expected = 0 if n < 400 else 1 + (n - 400) // 160
    x = _noise(n / P.sample_rate + 1e-9)[:n]
    assert frames_in(n, P) == expected
    assert log_mel(x, P).shape == (expected, P.n_mels)
    assert features(x, P).shape == (expected, P.n_mels)
    sf = StreamingFeatures(P)
    # Fewer frames than one window are held back for the level's start until flush().
    assert len(sf.push(x)) == (expected if expected >= P.chunk_frames else 0)
    assert len(sf.flush()) == (0 if expected >= P.chunk_frames else expected)


def test_frame_i_covers_its_samples() -> None:
    """Frame i depends only on samples [i*hop, i*hop + win): changing others leaves it equal."""
    x = _noise(0.2)
    a = log_mel(x, P)
    y = x.copy()
    y[5 * 160 + 400 :] = 0.0  # after frame 5
    y[: 5 * 160] = 0.0  # before frame 5
    np.testing.assert_array_equal(log_mel(y, P)[5], a[5])
    assert not np.allclose(log_mel(y, P)[4], a[4])


@pytest.mark.parametrize("gain", [0.5, 2.0, 4.0, 10.0])
def test_gain_invariance(gain: float) -> None:
    """features(g*x) == features(x) away from the log floor: a microphone's gain is not a cue.

    The residual is bounded by log_floor / (smallest mel power), here well under 1e-3.
    """
    x = _noise(3.0, std=0.5)
    a = features(x, P)
    b = features((x * gain).astype(np.float32), P)
    min_power = min(np.exp(log_mel(x, P)).min(), np.exp(log_mel(x * gain, P)).min())
    assert P.log_floor / min_power < 1e-3  # precondition: away from the floor
    np.testing.assert_allclose(b, a, atol=2e-3, rtol=0)
    # Raw log-mel does move by 2*ln(g): the invariance is the level's doing.
    shift = log_mel(x * gain, P).mean() - log_mel(x, P).mean()
    assert shift == pytest.approx(2 * np.log(gain), abs=1e-2)


def test_level_is_causal_running_mean() -> None:
    """The subtracted level is a causal EMA of per-frame mean log-mel, starting at the median of the
    first window's frame means."""
    x = _noise(2.0)
    lm = log_mel(x, P).astype(np.float64)
    level = lm - features(x, P)  # every bin carries the same level
    np.testing.assert_allclose(level, np.repeat(level[:, :1], P.n_mels, axis=1), atol=1e-5)
    m = lm.mean(axis=1)
    a = P.level_alpha
    ref = np.empty_like(m)
    ref[0] = a * np.median(m[: P.chunk_frames]) + (1 - a) * m[0]
    for t in range(1, len(m)):
        ref[t] = a * ref[t - 1] + (1 - a) * m[t]
    np.testing.assert_allclose(level[:, 0], ref, atol=1e-5)
    # Causality: a loud burst later does not change earlier features.
    y = x.copy()
    y[17000:] *= 10  # after the first window, which sets the level's start
    np.testing.assert_array_equal(features(y, P)[:104], features(x, P)[:104])


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    sizes=st.lists(st.one_of(st.integers(1, 3), st.integers(1, 500), st.integers(1000, 40000)), min_size=1, max_size=60),
)
def test_streaming_equals_offline(seed: int, sizes: list[int]) -> None:
    """Concatenated StreamingFeatures output equals features() of the whole signal (1e-5),
    for any block sizes, including 1-sample and huge blocks; frames_out counts them."""
    x = _noise(2.5, seed=seed)
    ref = features(x, P)
    sf = StreamingFeatures(P)
    out, pos = [], 0
    for n in sizes:
        out.append(sf.push(x[pos : pos + n]))
        pos += n
        if pos >= len(x):
            break
    if pos < len(x):
        out.append(sf.push(x[pos:]))
    out.append(sf.flush())
    got = np.concatenate(out)
    assert got.dtype == np.float32
    assert got.shape == ref.shape
    assert sf.frames_out == len(ref)
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_streaming_one_sample_at_a_time_and_reset() -> None:
    """1-sample pushes give the offline frames; reset() starts a new stream from scratch."""
    x = _noise(0.3)
    sf = StreamingFeatures(P)
    got = np.concatenate([sf.push(x[i : i + 1]) for i in range(len(x))] + [sf.flush()])
    np.testing.assert_allclose(got, features(x, P), atol=1e-5, rtol=0)
    sf.reset()
    assert sf.frames_out == 0
    y = _noise(1.3, seed=7)
    np.testing.assert_allclose(sf.push(y), features(y, P), atol=1e-5, rtol=0)


def test_streaming_keeps_short_tail() -> None:
    """The streaming frontend holds fewer than win_length unconsumed samples (bounded state)."""
    sf = StreamingFeatures(P)
    x = _noise(5.0)
    rng = np.random.default_rng(1)
    pos = 0
    while pos < len(x):
        n = int(rng.integers(1, 5000))
        sf.push(x[pos : pos + n])
        pos += n
        assert len(sf._tail) < P.win_length
        n = frames_in(min(pos, len(x)), P)
        assert sf.frames_out == (n if n >= P.chunk_frames else 0)  # the first window waits for the level


def test_rejects_non_mono() -> None:
    """A (N, 2) array is an error, not silently flattened."""
    with pytest.raises(ValueError, match="mono"):
        features(np.zeros((1000, 2), dtype=np.float32), P)
    with pytest.raises(ValueError, match="mono"):
        StreamingFeatures(P).push(np.zeros((1000, 2), dtype=np.float32))


def test_level_start_ignores_a_silent_lead_in() -> None:
    """A stream that opens on digital silence (a sound card starting, a file with a silent lead-in)
    does not make the next seconds look louder than they are: the level starts at the first window's
    median, so 30 ms of zeros change the features of the sound that follows by < 0.05."""
    x = _noise(3.0, std=0.05, seed=3)
    lead = np.concatenate([np.zeros(480, dtype=np.float32), x])
    a = features(x, P)
    b = features(lead, P)[3:]  # 480 samples = 3 frames
    assert np.abs(b[: len(a)] - a).mean() < 0.05
    # With the old start (the first frame's mean), the same lead-in biased them by about 7 (ln units).
    lm = log_mel(lead, P).astype(np.float64)
    m = lm.mean(axis=1)
    lev, prev = np.empty_like(m), m[0]
    for t, v in enumerate(m):
        prev = lev[t] = P.level_alpha * prev + (1 - P.level_alpha) * v
    assert np.abs((lm - lev[:, None])[3:103] - a[:100]).mean() > 3.0


def test_restart_level_starts_again_from_the_next_window() -> None:
    """After a device reopens (another gain), the level starts from the new audio's first window."""
    quiet = _noise(2.0, std=0.001, seed=4)
    loud = _noise(1.5, std=0.3, seed=5)
    restarted, carried = StreamingFeatures(P), StreamingFeatures(P)
    for sf in (restarted, carried):
        sf.push(quiet)
    restarted.restart_level()
    got, stale = restarted.push(loud), carried.push(loud)
    assert len(got) >= P.chunk_frames
    assert abs(got[5:].mean() - features(loud, P).mean()) < 0.1
    assert stale[5:].mean() - features(loud, P).mean() > 3.0  # the old level made it look 10+ dB louder
