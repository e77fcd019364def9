"""The web page's pure parts: the PNG writer and the clip spectrogram, the event log, access rules in the
configuration, and the token check."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest

from earshot.clipimage import MARK_RGB, ROW_PX, png_bytes, spectrogram_png
from earshot.config import ConfigError, from_dict, is_loopback, read_token, web_listen
from earshot.events import Event, iso_utc
from earshot.features import FrontendParams
from earshot.live import MAX_EVENTS, EventLog

pytestmark = pytest.mark.timeout(30)


def _decode_png(data: bytes) -> np.ndarray:
    """Enough of a PNG reader for what png_bytes writes (8-bit RGB, filter 0)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])[0] == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    assert (depth, color) == (8, 2)
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), dtype=np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_round_trip():
    """png_bytes writes exactly the pixels it is given."""
    rgb = np.random.default_rng(0).integers(0, 256, (7, 13, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_decode_png(png_bytes(rgb)), rgb)


def test_clip_spectrogram_marks_the_detection():
    """One column per 10 ms frame, 2 rows per mel band, the detection's span in the mark colour."""
    p = FrontendParams()
    audio = np.random.default_rng(1).normal(0, 0.1, p.sample_rate * 2).astype(np.float32)
    img = _decode_png(spectrogram_png(audio, p, (0.5, 1.0)))
    assert img.shape[0] == p.n_mels * ROW_PX and abs(img.shape[1] - 198) <= 2
    top = img[0]
    marked = np.where((top == MARK_RGB).all(axis=1))[0]
    assert 48 <= marked.min() <= 50 and 99 <= marked.max() <= 100
    assert not (img[:, 20] == MARK_RGB).all(axis=1).any()  # outside the detection: no mark


def _event(kind: str, eid: str, onset: float, label: str = "gunshot", clip: str | None = None) -> Event:
    end = kind == "end"
    return Event(type=kind, id=eid, label=label, source="yard", node="n", onset=onset,
                 offset=onset + 0.4 if end else None, onset_time=iso_utc(1.7e9 + onset),
                 offset_time=iso_utc(1.7e9 + onset + 0.4) if end else None, score=0.8 if end else 0.7, clip=clip)


def test_event_log_merges_start_and_end_newest_first():
    """A start and its end are one record with the duration and the peak score; newest first; bounded."""
    log = EventLog([{"id": "c0", "event_id": "e0", "source": "yard", "label": "alarm", "score": 0.9,
                     "onset": 1.0, "onset_time": iso_utc(1.6e9)}])
    log.add(_event("start", "e1", 5.0, clip="e1"))
    rec = log.add(_event("end", "e1", 5.0, clip="e1"))
    assert rec["duration_s"] == 0.4 and rec["score"] == 0.8 and not rec["active"]
    log.add(_event("start", "e2", 9.0, label="alarm"))
    assert [r["id"] for r in log.recent()] == ["e2", "e1", "e0"]
    assert [r["id"] for r in log.recent(label="gunshot")] == ["e1"]
    assert log.by_clip("c0")["id"] == "e0" and log.get("e2")["active"]
    for i in range(MAX_EVENTS + 5):
        log.add(_event("start", f"x{i}", float(i)))
    assert len(log.recent()) == MAX_EVENTS


def test_web_listen_and_loopback():
    """[web] listen wins; an older file's [clips] listen is still honoured; loopback is recognised."""
    assert web_listen(from_dict({})) == "127.0.0.1:8765"
    assert web_listen(from_dict({"clips": {"listen": "127.0.0.1:9000"}})) == "127.0.0.1:9000"
    assert web_listen(from_dict({"clips": {"listen": "127.0.0.1:9000"}, "web": {"listen": "[::1]:9100"}})) \
        == "[::1]:9100"
    assert [is_loopback(h) for h in ("127.0.0.1", "127.3.2.1", "::1", "localhost", "0.0.0.0", "::", "myhost",
                                     "192.168.1.5")] == [True, True, True, True, False, False, False, False]


def test_open_bind_needs_a_readable_token(tmp_path):
    """Beyond loopback without token_file, a missing or short token, and bad limits are all reported at once."""
    with pytest.raises(ConfigError) as e:
        from_dict({"web": {"listen": "0.0.0.0:8765", "workers": 0, "max_connections": 5}})
    text = str(e.value)
    assert "reachable from other machines" in text and "web.workers" in text and "web.max_connections" in text
    (tmp_path / "t").write_text("  secret-token-1  \nsecond line\n")
    config = from_dict({"web": {"listen": "0.0.0.0:8765", "token_file": str(tmp_path / "t")}})
    assert read_token(config.web.token_file) == "secret-token-1"
    with pytest.raises(ConfigError, match="cannot read"):
        from_dict({"web": {"token_file": str(tmp_path / "missing")}})
    # the web page off and clips not served: nothing listens, nothing to protect
    from_dict({"web": {"listen": "0.0.0.0:8765", "enabled": False}, "clips": {"http": False}})
