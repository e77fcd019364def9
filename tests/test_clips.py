"""Evidence clips on the real filesystem and over real HTTP: the right audio and duration, the clip id
in the events, retention by size and age, index and download, no directory traversal."""

from __future__ import annotations

import http.client
import json
import os
import time

import numpy as np
import pytest
import soundfile as sf

from earshot.clips import ClipRecorder, ClipServer
from earshot.events import Event, iso_utc

pytestmark = pytest.mark.timeout(30)

SR = 16000


def _event(type_: str, id_: str, onset: float, label: str = "gunshot") -> Event:
    end = type_ == "end"
    return Event(type=type_, id=id_, label=label, source="yard", node="n", onset=onset,
                 offset=onset + 0.3 if end else None, onset_time=iso_utc(1.7e9 + onset),
                 offset_time=iso_utc(1.7e9 + onset + 0.3) if end else None, score=0.9)


def _ramp(n: int) -> np.ndarray:
    """Audio whose every sample tells its index: a clip's samples prove where it was cut."""
    return ((np.arange(n) % 20000) / 20000.0 * 0.9).astype(np.float32)


def _feed(rec: ClipRecorder, audio: np.ndarray, a: int, b: int, block: int = 320) -> None:
    for i in range(a, b, block):
        rec.on_audio("yard", audio[i:min(b, i + block)])


def test_clip_has_the_audio_around_the_event(tmp_path):
    """A start at onset t yields `<id>.flac` with exactly [t - pre, t + post] of the source's audio,
    written once the post-roll is in; start and end events both carry the clip id."""
    rec = ClipRecorder(tmp_path, SR, pre_s=2.0, post_s=3.0, max_total_bytes=10**9, max_age_s=1e9)
    audio = _ramp(SR * 12)
    _feed(rec, audio, 0, SR * 6)
    start = rec.on_event(_event("start", "a" * 32, onset=5.0))  # detected about a hop after the onset
    assert start.clip == "a" * 32 and json.loads(start.to_json())["clip"] == "a" * 32
    _feed(rec, audio, SR * 6, SR * 7)
    assert rec.on_event(_event("end", "a" * 32, onset=5.0)).clip == "a" * 32
    assert not (tmp_path / f"{'a' * 32}.flac").exists()  # post-roll not complete yet
    _feed(rec, audio, SR * 7, SR * 9)
    assert _wait(lambda: (tmp_path / f"{'a' * 32}.json").exists())  # written last: the clip is complete
    clip, sr = sf.read(tmp_path / f"{'a' * 32}.flac", dtype="float32")
    assert sr == SR and len(clip) == 5 * SR
    np.testing.assert_allclose(clip, audio[3 * SR:8 * SR], atol=1.0 / 32768 + 1e-6)
    meta = json.loads((tmp_path / f"{'a' * 32}.json").read_text())
    assert meta["label"] == "gunshot" and meta["clip_start"] == 3.0 and meta["duration_s"] == 5.0
    rec.close()


def test_shutdown_writes_a_partial_clip(tmp_path):
    """A clip whose post-roll never comes (the source ended) is written at close with what there is."""
    rec = ClipRecorder(tmp_path, SR, pre_s=1.0, post_s=3.0, max_total_bytes=10**9, max_age_s=1e9)
    _feed(rec, _ramp(SR * 3), 0, SR * 3)
    rec.on_event(_event("start", "b" * 32, onset=2.5))
    rec.close()
    clip, _ = sf.read(tmp_path / f"{'b' * 32}.flac", dtype="float32")
    assert len(clip) == int(1.5 * SR)


def _wait(pred, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def test_retention_deletes_the_oldest_and_the_too_old(tmp_path):
    """Beyond the total size the oldest clips go first; clips older than the age limit go too."""
    rec = ClipRecorder(tmp_path, SR, pre_s=0.5, post_s=0.5, max_total_bytes=10**9, max_age_s=1e9)
    audio = (np.random.default_rng(0).standard_normal(SR * 10) * 0.1).astype(np.float32)  # noise: no compression
    ids = [c * 32 for c in "cdef"]
    for i, id_ in enumerate(ids):
        _feed(rec, audio, i * 2 * SR, (i * 2 + 1) * SR)
        rec.on_event(_event("start", id_, onset=i * 2 + 0.9))
        _feed(rec, audio, (i * 2 + 1) * SR, (i * 2 + 2) * SR)
        assert _wait(lambda: (tmp_path / f"{id_}.json").exists())  # written after the flac
        os.utime(tmp_path / f"{id_}.flac", (time.time() - 100 + i, time.time() - 100 + i))
    rec.close()
    size = (tmp_path / f"{ids[0]}.flac").stat().st_size
    rec.max_total_bytes = int(size * 2.5)
    assert rec.retain() == ids[:2]
    assert sorted(p.stem for p in tmp_path.glob("*.flac")) == ids[2:]
    assert not (tmp_path / f"{ids[0]}.json").exists()
    rec.max_age_s = 99.5 - 2  # ids[2] is 98 s old, ids[3] 97 s
    assert rec.retain() == [ids[2]]


def test_http_index_download_and_no_traversal(tmp_path):
    """The server lists clips as JSON, serves a clip's exact bytes, and answers 404 to anything that
    tries to leave the clip directory."""
    clips = tmp_path / "clips"
    rec = ClipRecorder(clips, SR, pre_s=0.5, post_s=0.5, max_total_bytes=10**9, max_age_s=1e9)
    _feed(rec, _ramp(SR * 3), 0, SR * 3)
    rec.on_event(_event("start", "9" * 32, onset=1.0))
    rec.close()
    (tmp_path / "secret.flac").write_bytes(b"not for you")
    server = ClipServer(clips, "127.0.0.1", 0)
    try:
        def get(path: str) -> tuple[int, bytes, str]:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=5)
            conn.request("GET", path)
            r = conn.getresponse()
            body = r.read()
            conn.close()
            return r.status, body, r.getheader("Content-Type") or ""

        status, body, ctype = get("/clips/")
        assert status == 200 and ctype == "application/json"
        index = json.loads(body)["clips"]
        assert [c["id"] for c in index] == ["9" * 32] and index[0]["label"] == "gunshot"
        status, body, ctype = get(f"/clips/{'9' * 32}.flac")
        assert status == 200 and ctype == "audio/flac" and body == (clips / f"{'9' * 32}.flac").read_bytes()
        for bad in ("/clips/../secret.flac", "/clips/..%2Fsecret.flac", "/clips/%2e%2e/secret.flac",
                    "/clips/../../etc/passwd", "/clips/.flac", "/etc/passwd", "/clips//etc/passwd.flac",
                    f"/clips/{'0' * 32}.flac"):
            assert get(bad)[0] == 404, bad
    finally:
        server.close()
